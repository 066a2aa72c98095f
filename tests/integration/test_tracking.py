"""Optional experiment tracking (scm.tracking): TensorBoard read back against stats.jsonl; W&B offline."""

import json
import sys
import types

import pytest

from scm import tracking
from scm.config import config_hash, resolve_from_dict
from scm.train import train

pytestmark = pytest.mark.slow

TINY = {"dataset": "shapes", "size": "tS", "method": "teacher", "data": {"num_images": 64},
        "network": {"model_channels": 8},
        "sampler": {"teacher_steps": 2},
        "run": {"batch_size": 16, "total_kimg": 0.128, "checkpoint_kimg": 0.064, "log_kimg": 0.032}}


def _stats(run_dir):
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def test_tensorboard_scalars_read_back_equal_stats_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train(resolve_from_dict(TINY, {"run.tracker": "tensorboard"}), run_dir)
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    rows = _stats(run_dir)
    for key in ("loss", "grad_norm", "lr"):
        events = acc.Scalars(f"train/{key}")
        assert [e.step for e in events] == [r["step"] for r in rows]
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6)
    # a sample grid at the mid-run checkpoint and at the end: 16 images of 16x16 in a 4x4 grid, 1 px padding
    images = acc.Images("samples/ema")
    assert [i.step for i in images] == [4, 8]
    assert (images[0].width, images[0].height) == (4 * 17 + 1, 4 * 17 + 1)


def test_tracker_is_not_part_of_the_run_identity(tmp_path):
    base = resolve_from_dict(TINY)
    assert config_hash(base) == config_hash(resolve_from_dict(TINY, {"run.tracker": "tensorboard"}))
    assert config_hash(base) != config_hash(resolve_from_dict(TINY, {"run.seed": 1}))


def test_wandb_goes_offline_without_network(tmp_path, monkeypatch):
    calls = {"log": []}

    class FakeRun:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Image=lambda a: ("image", a.shape)))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(tracking, "_reachable", lambda host, timeout_s=3.0: False)
    run_dir = tmp_path / "scd-tS-base-s0"
    t = tracking.make_tracker("wandb", run_dir, "proj", {"run": {"seed": 0}})
    t.log({"step": 3, "loss": 0.5, "time": 1e9, "note": "x"}, 3)
    t.close()
    assert calls["init"]["mode"] == "offline" and calls["init"]["id"] == "scd-tS-base-s0"
    assert calls["init"]["project"] == "proj" and calls["init"]["resume"] == "allow"
    assert calls["log"] == [(3, {"train/loss": 0.5})] and calls["finished"]
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracking.make_tracker("wandb", run_dir, "proj")
    assert calls["init"]["mode"] == "disabled"


def test_missing_tracker_package_is_one_error_naming_the_key(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match=r"run.tracker=wandb needs the wandb package"):
        tracking.make_tracker("wandb", "/tmp/x")
