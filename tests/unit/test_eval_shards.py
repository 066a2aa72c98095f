"""Sharded evaluation's pure parts: seed split, moment merge (FID), shard files and their identity, the
study's evaluation inputs, the report's evaluation hours."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from scm import eval_shards, evaluate, metrics
from scm.config import ConfigError, resolve
from scm.report import eval_hours

CLUSTERS = Path(__file__).resolve().parents[2] / "config" / "clusters.yaml"


@pytest.mark.parametrize(("n", "k"), [(10, 3), (7, 7), (50, 4), (5, 1)])
def test_split_seeds_covers_every_seed_once(n, k):
    seeds = list(range(100, 100 + n))
    parts = eval_shards.split_seeds(seeds, k)
    assert len(parts) == k and sorted(s for p in parts for s in p) == seeds
    assert all(len(p) in (n // k, n // k + 1) for p in parts)
    # the rule of `scm sample --shard I/N`
    assert parts == [seeds[i::k] for i in range(k)]
    with pytest.raises(ValueError, match="--shards"):
        eval_shards.split_seeds(seeds, 0)


def test_reduced_fid_equals_float64_frechet_of_concatenated_features():
    rng = np.random.default_rng(0)
    # skewed, correlated, float32 features with a large mean: what a moment merge could get wrong
    feats = (rng.gamma(2.0, 1.0, (301, 12)) @ rng.normal(size=(12, 12)) + 50).astype(np.float32)
    ref = rng.normal(size=(400, 12)) * 3 + 49
    mu_ref, sigma_ref = metrics.feature_statistics(ref)
    expected = metrics.frechet_distance(*metrics.feature_statistics(feats), mu_ref, sigma_ref)
    for k in (1, 3, 7):
        parts = [eval_shards._moments(torch.from_numpy(feats[i::k])) for i in range(k)]
        assert eval_shards.fid_from_shards(parts, mu_ref, sigma_ref) == pytest.approx(expected, rel=1e-10, abs=1e-10)
    # and the rows come back in seed order (KID's random subsets see the unsharded order)
    parts = [{"f": feats[i::3]} for i in range(3)]
    np.testing.assert_array_equal(eval_shards._gather(parts, "f", len(feats)), feats)


def test_shard_file_round_trip_identity_and_torn_files(tmp_path):
    ident = {"format": 1, "final_sha256": "ab" * 32, "steps": 2, "seeds": "0-9", "extractor_fingerprint": "x"}
    arrays = {"feat_a": np.arange(6, dtype=np.float32).reshape(3, 2), "n": np.int64(3)}
    path = eval_shards.write_shard(tmp_path / "s.npz", ident, arrays)
    got = eval_shards.read_shard(path, dict(ident))
    np.testing.assert_array_equal(got["feat_a"], arrays["feat_a"])
    assert int(got["n"]) == 3
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed
    for key, value in (("final_sha256", "cd" * 32), ("steps", 1), ("seeds", "0-8"), ("extractor_fingerprint", "y")):
        # another run / sampler / seeds / extractor
        assert eval_shards.read_shard(path, {**ident, key: value}) is None, key
    assert eval_shards.read_shard(tmp_path / "missing.npz", ident) is None
    path.write_bytes(path.read_bytes()[:40])  # a torn file (not possible through write_shard, but on a bad disk)
    assert eval_shards.read_shard(path, ident) is None
    assert eval_shards.shard_path(tmp_path, 2, 1, 0, 3).name == "steps2-set1-shard0of3.npz"


def test_study_eval_inputs_name_the_key_and_path(tmp_path):
    shapes = resolve("shapes", "tS", "sct").data
    assert evaluate.study_eval_inputs(shapes, {}) == {}  # the pipeline builds the shapes extractor
    latent = resolve("imagenet512", "S", "sct").data
    (tmp_path / "vae").mkdir()
    for f in ("inc.pt", "ref.pkl", "dino.pt"):
        (tmp_path / f).write_bytes(b"x")
    full = {"inception": str(tmp_path / "inc.pt"), "vae": str(tmp_path / "vae"), "ref_stats": str(tmp_path / "ref.pkl"),
            "fd_dinov2": True, "dinov2": str(tmp_path / "dino.pt")}
    assert evaluate.study_eval_inputs(latent, full) == {k: v for k, v in full.items() if k != "fd_dinov2"}
    with pytest.raises(ConfigError, match=r"^eval.vae: not set \(imagenet512 generates latents"):
        evaluate.study_eval_inputs(latent, {**full, "vae": None})
    with pytest.raises(ConfigError, match=rf"^eval.dinov2: {tmp_path}/nope.pt not found"):
        evaluate.study_eval_inputs(latent, {**full, "dinov2": str(tmp_path / "nope.pt")})
    assert evaluate.study_eval_inputs(latent, {**full, "fd_dinov2": False, "dinov2": None})
    cifar = resolve("cifar10", "S", "sct").data
    with pytest.raises(ConfigError, match="^eval.inception: not set"):
        evaluate.study_eval_inputs(cifar, {})


def test_eval_hours_gpu_and_cpu():
    g = pd.DataFrame([{"sample_seconds": 3000.0, "metric_seconds": 600.0, "eval_gpus": 2, "eval_threads": 8},
                      {"sample_seconds": 1800.0, "metric_seconds": 0.0, "eval_gpus": 2, "eval_threads": 8}])
    assert eval_hours(g) == (pytest.approx(3.0), None)  # (3600 + 1800) s x 2 GPUs
    cpu = pd.DataFrame([{"sample_seconds": 30.0, "metric_seconds": 6.0, "eval_gpus": 0, "eval_threads": 2}])
    assert eval_hours(cpu) == (None, pytest.approx(72 / 3600))
    old = pd.DataFrame([{"sample_seconds": 36.0, "metric_seconds": 0.0}])  # metrics written before these keys
    assert eval_hours(old) == (None, pytest.approx(0.01))


def test_eval_hours_reach_the_report_through_metrics_files(tmp_path):
    # what scm evaluate writes, read back as the report reads it (load_metrics), not a hand-made frame
    import json

    from scm.report import load_metrics

    entry = {"run_id": "scd-tS-base-s0", "steps": 2, "nfe": 2, "params": 1e6, "fid": [5.0], "fid_min": 5.0,
             "sample_seconds": 30.0, "metric_seconds": 6.0, "eval_gpus": 0, "eval_threads": 2}
    path = tmp_path / "scd-tS-base-s0.json"
    path.write_text(json.dumps([entry, {**entry, "steps": 1, "nfe": 1}]))
    assert eval_hours(load_metrics([path])) == (None, pytest.approx(2 * 72 / 3600))


def test_cli_shard_and_launcher_errors_are_one_line(tmp_path, capsys):
    from scm.cli import main

    base = ["evaluate", "--run-dir", str(tmp_path / "run"), "--steps", "1", "--out", str(tmp_path / "m.json")]
    for extra, message in ((["--shards", "0"], "--shards: expected a finite number >= 1"),
                           (["--num", "4", "--shards", "5"], "--shards: 5 shards for --num 4 samples"),
                           (["--launcher", "slurm"], "--cluster: the slurm launcher needs a cluster profile"),
                           (["--launcher", "slurm", "--cluster", "nope", "--clusters", str(CLUSTERS)],
                            "no cluster profile 'nope'")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert main(["sample", "--run-dir", str(tmp_path / "run"), "--steps", "1", "--num", "4", "--shards", "0",
                 "--out", str(tmp_path / "s")]) == 2
    assert "--shards" in capsys.readouterr().err
