"""Faults injected for real: a changed teacher, a lost config.json, two trainers on one run directory,
a killed waiting process, kill -9 without a checkpoint, corrupt checkpoints and final.pt, SIGTERM/SIGINT.

No test depends on the machine's speed: processes are paused (SIGSTOP) or signalled at chosen points;
deadlines only bound a test that fails."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from scm.checkpoint import checkpoint_digest, list_checkpoints, load_checkpoint, read_status
from scm.config import ConfigError, config_hash, from_dict, resolve_from_dict
from scm.train import train

pytestmark = pytest.mark.slow

TINY = {"dataset": "shapes", "size": "tS", "method": "teacher",
        "data": {"num_images": 256},
        "network": {"model_channels": 8, "num_blocks": 1, "channel_mult": [1, 2], "attn_resolutions": [8]},
        "run": {"batch_size": 16, "total_kimg": 0.32, "checkpoint_kimg": 0.128, "log_kimg": 0.064,
                "keep_checkpoints": 3, "threads": 1}}


def tiny_cfg(**over):
    return resolve_from_dict(TINY, over)


def write_cfg(tmp_path: Path, **run) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "run": {**TINY["run"], **run}}))
    return path


def scm_train(cfg_file, run_dir, *extra):
    return [sys.executable, "-m", "scm.cli", "train", "--config", str(cfg_file), "--run-dir", str(run_dir), *extra]


ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def wait_for(predicate, what: str, timeout_s: float = 300):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def stats_steps(run_dir: Path) -> list[int]:
    path = run_dir / "stats.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def status_pid(run_dir: Path):
    try:
        status = read_status(run_dir)
    except ValueError:  # caught mid-replace
        return None
    return status.get("pid") if status.get("state") == "running" else None


def final_weights(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "final.pt")["ema"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ----------------------------------------------------------------------------
# Item 2: a run's identity includes what it was built from.


def test_changed_teacher_restarts_scd(tmp_path, caplog):
    teacher_dir = tmp_path / "teacher"
    train(tiny_cfg(**{"run.total_kimg": 0.064}), teacher_dir)
    scd = tiny_cfg(**{"run.method": "scd", "run.teacher_run_dir": str(teacher_dir), "run.total_kimg": 0.032})
    train(scd, tmp_path / "scd", on_config_change="restart")
    old_final = (tmp_path / "scd" / "final.pt").read_bytes()
    old_sha = checkpoint_digest(teacher_dir / "final.pt")
    # the teacher is retrained under another config (another seed), as the pipeline does after a change
    train(tiny_cfg(**{"run.total_kimg": 0.064, "run.seed": 1}), teacher_dir, on_config_change="restart")
    new_sha = checkpoint_digest(teacher_dir / "final.pt")
    assert new_sha != old_sha
    with pytest.raises(ConfigError, match=rf"another teacher .*{old_sha[:16]}.*{new_sha[:16]}"):
        train(scd, tmp_path / "scd")  # on_config_change='error'
    status = train(scd, tmp_path / "scd", on_config_change="restart")
    assert status["state"] == "completed"
    assert "another teacher" in caplog.text and "restarting it from scratch" in caplog.text
    assert (tmp_path / "scd" / "final.pt").read_bytes() != old_final
    run = json.loads((tmp_path / "scd" / "run.json").read_text())
    assert run["upstream"] == {"teacher_final_sha256": new_sha}
    # reference: a fresh sCD run from the new teacher
    train(scd, tmp_path / "fresh")
    assert_same_weights(final_weights(tmp_path / "scd"), final_weights(tmp_path / "fresh"))


def test_lost_config_json_is_replaced_by_the_weights_own_config(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_cfg(**{"run.total_kimg": 0.064, "run.checkpoint_kimg": 0.016})
    other = tiny_cfg(**{"run.total_kimg": 0.064, "run.checkpoint_kimg": 0.016, "optim.lr": 0.005})
    train(cfg, run, stop_after_steps=2)
    (run / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"checkpoint-000000002\.pt: hash"):
        train(other, run)
    assert train(cfg, run)["state"] == "completed"  # the same config resumes
    (run / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"final\.pt: hash"):
        train(other, run)  # not 'already completed'
    assert train(other, run, on_config_change="restart")["state"] == "completed"
    assert config_hash(from_dict(load_checkpoint(run / "final.pt")["config"])) == config_hash(other)
    assert stats_steps(run) == [4]  # one log interval, written once


# ----------------------------------------------------------------------------
# Item 3: one trainer per run directory.


def test_two_trainers_on_one_run_directory_train_once(tmp_path):
    cfg_file, run = write_cfg(tmp_path), tmp_path / "run"
    with open(tmp_path / "a.err", "w") as a_err, open(tmp_path / "b.err", "w") as b_err:
        a = subprocess.Popen(scm_train(cfg_file, run), env=ENV, stdout=subprocess.DEVNULL, stderr=a_err)
        b = None
        try:
            wait_for(lambda: status_pid(run) == a.pid, "the first trainer to start")
            os.kill(a.pid, signal.SIGSTOP)  # it holds the run: keep it from finishing first
            b = subprocess.Popen(scm_train(cfg_file, run), env=ENV, stdout=subprocess.DEVNULL, stderr=b_err)
            wait_for(lambda: f"in use by another trainer (pid {a.pid}" in (tmp_path / "b.err").read_text(),
                     "the second trainer to name the first")
        finally:
            os.kill(a.pid, signal.SIGCONT)
        assert a.wait(timeout=600) == 0
        assert b.wait(timeout=600) == 0
    assert stats_steps(run) == list(range(4, 21, 4))  # trained once
    assert "already completed" in (tmp_path / "b.err").read_text()


def test_killed_local_waiter_reattaches_instead_of_resubmitting(tmp_path):
    cfg_file, run = write_cfg(tmp_path), tmp_path / "run"
    cmd = scm_train(cfg_file, run, "--launcher", "local", "--poll", "0.2")
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trainer = wait_for(lambda: status_pid(run), "the job's trainer to start")
    os.kill(trainer, signal.SIGSTOP)
    try:
        first.send_signal(signal.SIGKILL)  # the waiting process dies; its job goes on
        first.wait()
        job_id = json.loads((run / "job.json").read_text())["job_id"]
        with open(tmp_path / "second.err", "w") as err:
            second = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=err, text=True)
            wait_for(lambda: f"re-attaching to local job {job_id}" in (tmp_path / "second.err").read_text(),
                     "the rerun to re-attach")
    finally:
        os.kill(trainer, signal.SIGCONT)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, (tmp_path / "second.err").read_text()[-3000:]
    assert json.loads(out.splitlines()[-1])["state"] == "completed"
    assert len(list((run / "jobs").iterdir())) == 1  # one submission
    assert stats_steps(run) == list(range(4, 21, 4))


# ----------------------------------------------------------------------------
# Item 4: status and progress that do not lie.


def test_kill9_without_a_checkpoint_is_dead_then_restarts_without_duplicate_stats(tmp_path):
    cfg_file, run = write_cfg(tmp_path, checkpoint_kimg=100.0), tmp_path / "run"  # no periodic checkpoint
    proc = subprocess.Popen(scm_train(cfg_file, run), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: stats_steps(run) or proc.poll() is not None, "a stats line")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list_checkpoints(run)
    status = read_status(run)
    assert status["state"] == "dead" and f"pid {proc.pid}" in status["reason"]
    subprocess.run(scm_train(cfg_file, run), env=ENV, check=True, capture_output=True)
    assert stats_steps(run) == list(range(4, 21, 4))


def test_all_checkpoints_corrupt_restarts_loudly_from_zero(tmp_path, caplog):
    cfg = tiny_cfg(**{"run.total_kimg": 0.384})
    train(cfg, tmp_path, stop_after_steps=20)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [8, 16]
    for _, path in list_checkpoints(tmp_path):
        path.write_bytes(path.read_bytes()[:1000])
    assert train(cfg, tmp_path)["state"] == "completed"
    assert "NO USABLE CHECKPOINT: all 2 checkpoints" in caplog.text
    assert stats_steps(tmp_path) == list(range(4, 25, 4))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_checkpoint_at_a_step_boundary(tmp_path, sig, caplog):
    caplog.set_level(logging.INFO, logger="scm.train")
    # a long run (stopped long before its end), no periodic checkpoint
    cfg_file, run = write_cfg(tmp_path, total_kimg=64.0, checkpoint_kimg=100.0), tmp_path / "run"
    with open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen(scm_train(cfg_file, run), env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        wait_for(lambda: stats_steps(run), "a stats line")
        proc.send_signal(sig)
        assert proc.wait(timeout=300) == 128 + sig
    text = (tmp_path / "err").read_text()
    last = [line for line in text.replace("\r", "\n").splitlines() if line.strip()][-1]
    name = signal.Signals(sig).name
    assert last.startswith(f"scm: {name}: stopped at step ") and "Traceback" not in text
    status = read_status(run)
    step = status["step"]
    assert status["state"] == "interrupted" and name in status["reason"] and step >= stats_steps(run)[-1]
    assert [s for s, _ in list_checkpoints(run)] == [step]
    assert load_checkpoint(list_checkpoints(run)[0][1])["step"] == step
    # running again resumes from it
    train(resolve_from_dict(yaml.safe_load(cfg_file.read_text())), run, stop_after_steps=1)
    assert f"resumed from {list_checkpoints(run)[0][1]} at step {step}" in caplog.text


def test_corrupt_final_is_detected_and_repaired(tmp_path, capsys, caplog):
    from scm.cli import main

    run = tmp_path / "run"
    cfg = tiny_cfg(**{"run.total_kimg": 0.128, "run.checkpoint_kimg": 0.064})
    train(cfg, run)
    good = final_weights(run)
    data = bytearray((run / "final.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (run / "final.pt").write_bytes(bytes(data))
    capsys.readouterr()
    rc = main(["sample", "--run-dir", str(run), "--steps", "1", "--num", "2", "--out", str(tmp_path / "png")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert str(run / "final.pt") in err and "scm train" in err
    status = train(cfg, run)  # the rerun repairs it
    assert status["state"] == "completed"
    assert f"{run / 'final.pt'} is corrupt" in caplog.text
    assert_same_weights(final_weights(run), good)
