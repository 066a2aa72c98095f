"""Training end to end on the CPU: resume bit-exactness after SIGKILL, NaN handling, sCD from a teacher."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from scm.checkpoint import list_checkpoints, load_checkpoint, read_status
from scm.config import config_hash, resolve_from_dict
from scm.train import DivergedError, TeacherNotReadyError, train

pytestmark = pytest.mark.slow

TINY = {"dataset": "shapes", "size": "tS", "method": "teacher",
        "data": {"num_images": 256},
        "network": {"model_channels": 8},
        "run": {"batch_size": 16, "total_kimg": 0.64, "checkpoint_kimg": 0.128, "log_kimg": 0.064,
                "keep_checkpoints": 3}}


def tiny_cfg(**over):
    return resolve_from_dict(TINY, over)


def _scm_train(cfg_file, run_dir, *extra):
    return [sys.executable, "-m", "scm.cli", "train", "--config", str(cfg_file), "--run-dir", str(run_dir), *extra]


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(TINY))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # uninterrupted reference
    subprocess.run(_scm_train(cfg_file, tmp_path / "ref"), check=True, env=env, capture_output=True)
    # the same run, killed with SIGKILL once its second checkpoint exists, then run again
    run = tmp_path / "killed"
    proc = subprocess.Popen(_scm_train(cfg_file, run), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list_checkpoints(run)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    status = read_status(run)  # killed: neither completed nor still 'running'
    assert status["state"] == "dead" and f"pid {proc.pid}" in status["reason"]
    assert 0 < len(list_checkpoints(run))
    subprocess.run(_scm_train(cfg_file, run), check=True, env=env, capture_output=True)
    ref, resumed = load_checkpoint(tmp_path / "ref" / "final.pt"), load_checkpoint(run / "final.pt")
    assert ref["step"] == resumed["step"] == 40
    for key in ("net", "ema"):
        for name, value in ref[key].items():
            assert torch.equal(value, resumed[key][name]), f"{key}.{name} differs after resume"
    # stats were not duplicated by the resume
    steps = [json.loads(line)["step"] for line in (run / "stats.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 40


def test_nan_stops_with_step_and_last_checkpoint(tmp_path, monkeypatch):
    import scm.train

    real = scm.train.build_loss

    def poisoned(*args, **kwargs):
        fn = real(*args, **kwargs)

        def call(net, x0, labels=None, step=0):
            loss, diag = fn(net, x0, labels, step)
            if step >= 12:
                loss = loss * float("nan")
                diag = {**diag, "loss": float("nan")}
            return loss, diag
        return call

    monkeypatch.setattr(scm.train, "build_loss", poisoned)
    with pytest.raises(DivergedError, match=r"at step 14 .*last good checkpoint: .*checkpoint-000000008.pt"):
        train(tiny_cfg(**{"run.max_bad_batches": 2}), tmp_path)
    status = read_status(tmp_path)
    assert status["state"] == "diverged" and "step 14" in status["reason"]


def test_scd_needs_a_finished_teacher_and_starts_from_its_ema(tmp_path):
    teacher_dir = tmp_path / "teacher"
    cfg = tiny_cfg(**{"run.method": "scd", "run.teacher_run_dir": str(teacher_dir), "run.total_kimg": 0.064})
    with pytest.raises(TeacherNotReadyError, match=str(teacher_dir / "final.pt")):
        train(cfg, tmp_path / "scd")
    assert not (tmp_path / "scd").exists()  # refused before the run directory was made
    status = train(tiny_cfg(**{"run.total_kimg": 0.128}), teacher_dir)
    assert status["state"] == "completed"
    # stop sCD after 0 steps: the student's weights are the teacher's EMA weights
    train(cfg, tmp_path / "scd0", stop_after_steps=0)
    out = train(cfg, tmp_path / "scd")
    assert out["state"] == "completed"
    stats = [json.loads(line) for line in (tmp_path / "scd" / "stats.jsonl").read_text().splitlines()]
    assert all("g_norm" in row and row["loss"] == row["loss"] for row in stats)
    run = json.loads((tmp_path / "scd" / "run.json").read_text())
    assert run["config_hash"] == config_hash(cfg) and "torch" in run["versions"]


def test_student_initialized_from_teacher_ema(tmp_path):
    from scm.train import load_final

    teacher_dir = tmp_path / "teacher"
    train(tiny_cfg(**{"run.total_kimg": 0.128}), teacher_dir)
    teacher, _ = load_final(teacher_dir, "ema")
    captured = {}
    import scm.train

    real = scm.train.EMA

    class Spy(real):
        def __init__(self, net, cfg):
            captured["student"] = {k: v.clone() for k, v in net.state_dict().items()}
            super().__init__(net, cfg)

    scm.train.EMA = Spy
    try:
        train(tiny_cfg(**{"run.method": "scd", "run.teacher_run_dir": str(teacher_dir), "run.total_kimg": 0.016}),
              tmp_path / "scd")
    finally:
        scm.train.EMA = real
    for k, v in teacher.state_dict().items():
        assert torch.equal(captured["student"][k], v), k


def test_stats_and_status_files(tmp_path):
    old = os.umask(0o027)  # results are shared: every file follows the umask, like stats.jsonl does
    try:
        status = train(tiny_cfg(**{"run.method": "sct"}), tmp_path)
    finally:
        os.umask(old)
    assert status["state"] == "completed" and status["step"] == 40
    assert status["pid"] == os.getpid() and status["host"] and "updated" in status
    rows = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    for key in ("loss", "mse", "g_norm", "grad_norm", "lr", "sec_per_kimg", "peak_mem_mb", "kimg"):
        assert key in rows[-1], key
    assert Path(tmp_path / "final.pt").exists() and (tmp_path / "config.json").exists()
    for name in ("config.json", "run.json", "status.json", "stats.jsonl", "final.pt",
                 *(f"checkpoints/{p.name}" for _, p in list_checkpoints(tmp_path))):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


def test_setup_error_leaves_status_failed_with_the_reason(tmp_path, monkeypatch):
    import scm.train

    def unreadable(*args, **kwargs):
        raise OSError("dataset shard 3 is unreadable")

    monkeypatch.setattr(scm.train, "build_dataset", unreadable)
    with pytest.raises(OSError):
        train(tiny_cfg(), tmp_path)
    status = read_status(tmp_path)
    assert status["state"] == "failed" and status["reason"] == "OSError: dataset shard 3 is unreadable"


def test_on_eval_hook_and_stop_training(tmp_path):
    from scm.train import StopTraining

    seen = []

    def on_eval(step, kimg, ema_model):
        seen.append(step)
        assert not ema_model.training
        if step >= 20:
            raise StopTraining("pruned at step 20")

    with pytest.raises(StopTraining):
        train(tiny_cfg(**{"run.eval_kimg": 0.16}), tmp_path, on_eval=on_eval)
    assert seen == [10, 20]
    assert read_status(tmp_path) == {**read_status(tmp_path), "state": "stopped", "reason": "pruned at step 20"}


@pytest.mark.parametrize("method", ["teacher", "sct"])
def test_bf16_autocast_training_on_cpu(tmp_path, method):
    # mixed precision: residual streams in fp32 meet bf16 branches (mp_sum must promote)
    status = train(tiny_cfg(**{"run.method": method, "run.precision": "bf16", "run.total_kimg": 0.08}), tmp_path)
    assert status["state"] == "completed"
    stats = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert all(row["loss"] == row["loss"] for row in stats)  # finite
