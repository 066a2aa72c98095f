"""Sharded evaluation and sampling as a SLURM job array on the real test cluster (tests/slurm/cluster.sh)."""

import json
import logging
from pathlib import Path

import pytest

from scm import extractors
from scm.cli import main
from scm.config import resolve_from_dict
from scm.train import train

ROOT = Path(__file__).resolve().parents[2]
TINY = {"dataset": "shapes", "size": "tS", "method": "sct", "data": {"num_images": 256},
        "network": {"model_channels": 8}, "run": {"batch_size": 16, "total_kimg": 0.032}}
SLURM = ["--launcher", "slurm", "--cluster", "test", "--clusters", str(ROOT / "config" / "clusters.yaml")]


def test_sharded_evaluation_array_equals_local_and_resumes(slurm_cluster, tmp_path, caplog):
    run = tmp_path / "run"
    train(resolve_from_dict(TINY), run)
    weights = tmp_path / "shapes-features-quick.pt"  # any fixed extractor: the test compares two evaluations
    extractors.train_shapes_extractor(weights, steps=40, batch=32, train_images=256, test_images=64)
    base = ["evaluate", "--run-dir", str(run), "--steps", "2", "--num", "30", "--kid-subsets", "10", "--batch", "16",
            "--extractor-weights", str(weights), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
            "--threads", "1"]
    assert main([*base, "--out", str(tmp_path / "local.json")]) == 0
    out = tmp_path / "slurm.json"
    caplog.set_level(logging.INFO, logger="scm.eval_shards")
    assert main([*base, *SLURM, "--shards", "3", "--out", str(out)]) == 0
    local, sharded = json.loads((tmp_path / "local.json").read_text()), json.loads(out.read_text())
    assert sorted(sharded[0]) == sorted(local[0])
    for key in ("fid", "fjd", "class_accuracy", "kid", "precision", "recall"):
        assert sharded[0][key] == pytest.approx(local[0][key], rel=1e-5, abs=1e-7), key
    assert "3 of 3 shards to compute (0,1,2)" in caplog.text and "submitted slurm array" in caplog.text
    # A killed task: its shard file is gone -> the re-run submits an array of that one task only.
    shard_dir = tmp_path / "slurm.json.shards"
    mtimes = {f.name: f.stat().st_mtime_ns for f in shard_dir.glob("*.npz")}
    assert len(mtimes) == 3
    (shard_dir / "steps2-set0-shard2of3.npz").unlink()
    caplog.clear()
    assert main([*base, *SLURM, "--shards", "3", "--out", str(out)]) == 0
    assert "1 of 3 shards to compute (2)" in caplog.text and "(1 tasks)" in caplog.text
    now = {f.name: f.stat().st_mtime_ns for f in shard_dir.glob("*.npz")}
    assert [n for n in now if now[n] != mtimes.get(n)] == ["steps2-set0-shard2of3.npz"]
    assert json.loads(out.read_text())[0]["fid"] == pytest.approx(local[0]["fid"], rel=1e-5)
    # Samples: the array's PNGs (and grid) are the bytes of the local, unsharded sampling.
    sample = ["sample", "--run-dir", str(run), "--steps", "2", "--num", "24", "--batch", "16", "--device", "cpu"]
    assert main([*sample, "--out", str(tmp_path / "png-local")]) == 0
    assert main([*sample, *SLURM, "--shards", "3", "--out", str(tmp_path / "png-slurm")]) == 0
    names = sorted(p.name for p in (tmp_path / "png-local").glob("*.png"))
    assert len(names) == 25  # 24 samples + grid.png
    for name in names:
        assert (tmp_path / "png-slurm" / name).read_bytes() == (tmp_path / "png-local" / name).read_bytes(), name
