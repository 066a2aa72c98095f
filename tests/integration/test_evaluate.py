"""Sampling and evaluation of tiny trained runs on the CPU: determinism per seed, offline evaluation."""

import json
import socket

import pandas as pd
import pytest
import torch

from scm import evaluate, extractors, metrics
from scm.cli import main
from scm.config import resolve, resolve_from_dict
from scm.train import train

pytestmark = pytest.mark.slow

TINY = {"dataset": "shapes", "size": "tS", "data": {"num_images": 256}, "network": {"model_channels": 8},
        "run": {"batch_size": 16, "total_kimg": 0.032}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny finished runs: a teacher and an sCT model (a few seconds each)."""
    root = tmp_path_factory.mktemp("runs")
    for method in ("teacher", "sct"):
        train(resolve_from_dict({**TINY, "method": method}), root / f"tiny-{method}")
    return root


@pytest.fixture(scope="session")
def fast_extractor(tmp_path_factory):
    """A quickly trained shapes extractor (shared with tests/unit/test_metrics.py within one session)."""
    path = tmp_path_factory.getbasetemp() / "shapes-features-fast.pt"
    if not path.exists():
        # = test_metrics.FAST
        extractors.train_shapes_extractor(path, steps=300, batch=64, train_images=2048, test_images=512)
    return path


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if args else kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ----------------------------------------------------------------------------
# Seeds


def test_parse_seeds_and_shards():
    assert evaluate.parse_seeds("0-3,7,9-10") == [0, 1, 2, 3, 7, 9, 10]
    assert evaluate.format_seeds([0, 1, 2, 3, 7, 9, 10]) == "0-3,7,9-10"
    assert evaluate.parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "1", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            evaluate.parse_shard(bad)
    with pytest.raises(ValueError, match="--seeds"):
        evaluate.parse_seeds("3-1")


# ----------------------------------------------------------------------------
# Sampling: the same seed gives the same PNG bytes for any batch size and shard


def test_sample_is_deterministic_per_seed(runs, tmp_path, capsys):
    run = str(runs / "tiny-sct")
    base = ["sample", "--run-dir", run, "--steps", "2", "--device", "cpu"]
    assert main([*base, "--seeds", "0-39", "--batch", "16", "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--num", "40", "--batch", "24", "--out", str(tmp_path / "b")]) == 0
    for i in range(3):
        assert main([*base, "--seeds", "0-39", "--batch", "16", "--shard", f"{i}/3", "--out", str(tmp_path / "c")]) == 0
    assert main([*base, "--seeds", "5,17-19", "--batch", "32", "--out", str(tmp_path / "d")]) == 0
    assert "wrote 40 samples (NFE 2)" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "a").glob("0*.png"))
    assert names == [f"{k:06d}.png" for k in range(40)]
    assert (tmp_path / "a" / "grid.png").exists()
    for other in ("b", "c"):
        assert sorted(p.name for p in (tmp_path / other).glob("0*.png")) == names
    for name in names:
        data = (tmp_path / "a" / name).read_bytes()
        assert (tmp_path / "b" / name).read_bytes() == data and (tmp_path / "c" / name).read_bytes() == data
    for k in (5, 17, 18, 19):
        assert (tmp_path / "d" / f"{k:06d}.png").read_bytes() == (tmp_path / "a" / f"{k:06d}.png").read_bytes()
    # Different seeds give different images.
    assert (tmp_path / "a" / "000000.png").read_bytes() != (tmp_path / "a" / "000001.png").read_bytes()


def test_teacher_sampling_uses_solver_steps_and_labels(runs):
    from scm.train import load_final

    net, cfg = load_final(runs / "tiny-teacher")
    images, nfe = evaluate.generate(net, cfg, [0, 1, 2], steps=3, batch=16)
    assert images.dtype == torch.uint8
    assert images.shape == (3, 3, 16, 16) and nfe == 5  # DPM-Solver-2S: 2 x steps - 1
    assert evaluate.generate(net, cfg, [0], steps=3, batch=16, solver="euler")[1] == 3
    _, labels, _ = evaluate.seed_inputs([0, 1, 2, 3], (3, 16, 16), 8)
    assert labels.shape == (4,) and int(labels.max()) < 8


def test_latent_runs_need_a_vae():
    cfg = resolve("imagenet512", "S", "sct")
    with pytest.raises(ValueError, match="--vae"):
        evaluate.generate(None, cfg, [0], steps=1)
    with pytest.raises((ImportError, FileNotFoundError), match="vae|VAE"):
        evaluate.load_vae("/nonexistent/sd-vae")


# ----------------------------------------------------------------------------
# Evaluation: offline, metrics.json fields


def test_evaluate_offline_writes_metrics_json(runs, fast_extractor, tmp_path, offline, capsys):
    out = tmp_path / "metrics.json"
    rc = main(["evaluate", "--run-dir", str(runs / "tiny-sct"), "--steps", "1", "2", "--num", "64",
               "--seed-sets", "2", "--kid-subsets", "10", "--extractor-weights", str(fast_extractor),
               "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--device", "cpu"])
    assert rc == 0
    entries = json.loads(out.read_text())
    assert [e["steps"] for e in entries] == [1, 2] and [e["nfe"] for e in entries] == [1, 2]
    for e in entries:
        for key in ("run_id", "method", "size", "params", "nfe", "effective_compute", "fid", "fid_min", "fid_mean",
                    "fid_sd", "kid", "precision", "recall", "feature_extractor", "ref_stats", "num_samples",
                    "seeds", "extractor_accuracy", "extractor_shapes_version", "fid_max", "class_accuracy",
                    "class_accuracy_mean", "class_accuracy_sd", "class_accuracy_min", "class_accuracy_max", "fjd",
                    "fjd_mean"):
            assert key in e, key
        assert e["run_id"] == "tiny-sct" and e["method"] == "sct" and e["size"] == "tS"
        assert e["feature_extractor"] == extractors.SHAPES_EXTRACTOR
        assert e["ref_stats"].startswith(f"shapes-data1-{extractors.SHAPES_EXTRACTOR}-")
        assert e["extractor_shapes_version"] == 1
        assert len(e["fid"]) == 2 and e["fid_min"] == min(e["fid"]) and e["fid_sd"] is not None
        assert e["fid_max"] == max(e["fid"])
        # Class accuracy per seed set: the classifier's verdict on the seeds' own conditioning labels.
        assert len(e["class_accuracy"]) == 2 and all(0 <= a <= 1 for a in e["class_accuracy"])
        assert e["class_accuracy_mean"] == pytest.approx(sum(e["class_accuracy"]) / 2)
        assert len(e["fjd"]) == 2 and all(f >= 0 for f in e["fjd"])
        assert e["seeds"] == ["0-63", "64-127"] and e["num_samples"] == 64
        assert e["effective_compute"] == pytest.approx(e["params"] / 1e9 * e["nfe"])
    assert (tmp_path / "cache" / f"{entries[0]['ref_stats']}.npz").exists()
    assert len(pd.DataFrame(json.loads(out.read_text()))) == 2
    printed = capsys.readouterr().out
    assert "tiny-sct" in printed and "class acc" in printed
    # The same samples, classified here: seed k's label comes from generator k, as in generate.
    from scm.train import load_final

    net, cfg = load_final(runs / "tiny-sct", "ema")
    gen, _ = evaluate.generate(net, cfg, list(range(64)), 2)
    labels = torch.stack([torch.randint(8, (), generator=_after_noise(k)) for k in range(64)])
    ref = metrics.make_reference("shapes", gen[:8], weights_path=fast_extractor, cache_dir=tmp_path / "cache")
    assert entries[1]["class_accuracy"][0] == pytest.approx(metrics.class_accuracy(gen, labels, ref))


def _after_noise(seed: int) -> torch.Generator:
    """Generator `seed` after the sample's noise draw (3 x 16 x 16 normals), where its label is drawn."""
    g = torch.Generator().manual_seed(seed)
    torch.randn((3, 16, 16), generator=g)
    return g


def test_imported_ref_stats_agree_with_calculate_metrics(runs, fast_extractor, tmp_path, offline):
    run = runs / "tiny-teacher"
    npz = tmp_path / "shapes-ref.npz"
    assert main(["data", "ref-stats", "--run-dir", str(run), "--out", str(npz), "--device", "cpu",
                 "--extractor-weights", str(fast_extractor), "--cache-dir", str(tmp_path / "cache")]) == 0
    mu, sigma, meta = metrics.load_ref_stats(npz)
    assert mu.shape == (149,) and meta["num_images"] == 256
    kw = dict(steps=[2], num=64, extractor_weights=fast_extractor, cache_dir=tmp_path / "cache", device="cpu",
              kid_subsets=10)
    main_path = evaluate.evaluate_run(run, **kw)[0]
    imported = evaluate.evaluate_run(run, ref_stats=npz, **kw)[0]
    assert imported["fid"][0] == pytest.approx(main_path["fid"][0], rel=1e-3)
    assert imported["kid"] is None and imported["ref_stats"] == "shapes-ref"


def test_evaluate_errors_are_one_line(runs, tmp_path, capsys):
    rc = main(["evaluate", "--run-dir", str(tmp_path / "missing"), "--steps", "1", "--out", str(tmp_path / "m.json")])
    assert rc == 2 and "train it first" in capsys.readouterr().err
    rc = main(["evaluate", "--run-dir", str(runs / "tiny-sct"), "--steps", "1",
               "--extractor", extractors.INCEPTION_EXTRACTOR, "--extractor-weights", str(tmp_path / "inception.pth"),
               "--out", str(tmp_path / "m.json")])
    assert rc == 2 and "scm data fetch-weights inception" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# Sharded evaluation (scm.eval_shards): the same metrics.json as the unsharded path; resumable shards


def _compare_entries(sharded: list[dict], plain: list[dict]) -> None:
    """Same keys; FID (and every metric) equal to float tolerance; bookkeeping equal."""
    assert [sorted(e) for e in sharded] == [sorted(e) for e in plain]
    for s, p in zip(sharded, plain, strict=True):
        for key in ("fid", "fjd", "class_accuracy"):
            assert s[key] == pytest.approx(p[key], rel=1e-5, abs=1e-6), key
        for key in ("fid_min", "fid_mean", "kid", "precision", "recall"):
            assert s[key] == pytest.approx(p[key], rel=1e-5, abs=1e-7), key
        for key in ("run_id", "steps", "nfe", "seeds", "num_samples", "ref_stats", "extractor_fingerprint"):
            assert s[key] == p[key], key


def test_sharded_evaluation_equals_unsharded_and_resumes(runs, fast_extractor, tmp_path, offline, caplog):
    run = runs / "tiny-sct"
    base = ["evaluate", "--run-dir", str(run), "--steps", "1", "2", "--num", "40", "--seed-sets", "2",
            "--kid-subsets", "10", "--extractor-weights", str(fast_extractor), "--cache-dir", str(tmp_path / "cache"),
            "--device", "cpu", "--batch", "16"]
    assert main([*base, "--out", str(tmp_path / "plain.json")]) == 0
    out = tmp_path / "sharded.json"
    assert main([*base, "--shards", "3", "--out", str(out)]) == 0
    plain, sharded = json.loads((tmp_path / "plain.json").read_text()), json.loads(out.read_text())
    _compare_entries(sharded, plain)
    shard_dir = tmp_path / "sharded.json.shards"
    files = sorted(shard_dir.glob("*.npz"))
    assert len(files) == 2 * 2 * 3  # steps x seed sets x shards
    # A kill: one shard's file gone (and another truncated) -> only shard 1 runs again, the rest is kept.
    mtimes = {f.name: f.stat().st_mtime_ns for f in files}
    (shard_dir / "steps2-set1-shard1of3.npz").unlink()
    (shard_dir / "steps1-set0-shard1of3.npz").write_bytes(b"PK\x03\x04 torn")
    caplog.set_level("INFO", logger="scm.eval_shards")
    assert main([*base, "--shards", "3", "--out", str(out)]) == 0
    assert "1 of 3 shards to compute (1)" in caplog.text
    redone = {f.name for f in shard_dir.glob("*.npz") if f.stat().st_mtime_ns != mtimes.get(f.name)}
    assert redone == {"steps2-set1-shard1of3.npz", "steps1-set0-shard1of3.npz"}
    _compare_entries(json.loads(out.read_text()), plain)
