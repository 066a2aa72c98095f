"""scm training through submitit on the real test SLURM cluster (tests/slurm/cluster.sh)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from scm.checkpoint import list_checkpoints, read_status
from scm.config import resolve_from_dict
from scm.launch import get_profile, submit, wait

ROOT = Path(__file__).resolve().parents[2]
TINY = {"dataset": "shapes", "size": "tS", "method": "teacher", "data": {"num_images": 256},
        "network": {"model_channels": 8},
        "run": {"batch_size": 16, "total_kimg": 1.6, "checkpoint_kimg": 0.32, "log_kimg": 0.16}}


def _cli(cfg_file, run_dir, *extra):
    return [sys.executable, "-m", "scm.cli", "train", "--config", str(cfg_file), "--run-dir", str(run_dir),
            "--launcher", "slurm", "--cluster", "test", "--clusters", str(ROOT / "config" / "clusters.yaml"),
            "--poll", "1", *extra]


def _sacct_jobs(name: str) -> list[str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "--name", name, "-o", "JobID"], capture_output=True,
                         text=True, check=True).stdout
    return [line for line in out.split() if line]


def test_tiny_training_on_slurm_completes(slurm_cluster, tmp_path):
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(TINY))
    proc = subprocess.run(_cli(cfg_file, tmp_path / "run"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_status(tmp_path / "run")["state"] == "completed"
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    job = json.loads((tmp_path / "run" / "job.json").read_text())
    assert run["slurm_job_ids"] == [job["job_id"]]


def test_scontrol_requeue_resumes_from_checkpoint(slurm_cluster, tmp_path):
    cfg = resolve_from_dict(TINY, {"run.total_kimg": 6.4})  # 400 steps: longer than the kill grace
    run_dir = tmp_path / "run"
    job = submit(cfg, run_dir, "slurm", get_profile(ROOT / "config" / "clusters.yaml", "test"))
    deadline = time.time() + 300
    while not list_checkpoints(run_dir) and time.time() < deadline:
        time.sleep(0.5)
    assert list_checkpoints(run_dir), "no checkpoint before the deadline"
    # a bare requeue sends no signal: the job restarts and must resume from its newest checkpoint
    subprocess.run(["scontrol", "requeue", str(job.job_id)], check=True)
    status = wait(job, run_dir, poll_s=1)
    assert status["state"] == "completed" and status["step"] == 400
    logs = "".join(p.read_text() for p in run_dir.glob("jobs/*/*_log.err"))
    assert "resumed from" in logs
    steps = [json.loads(line)["step"] for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 400


def test_killed_waiter_reattaches_instead_of_resubmitting(slurm_cluster, tmp_path):
    cfg = dict(TINY, run={**TINY["run"], "seed": 7})
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    waiter = subprocess.Popen(_cli(cfg_file, run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while not (run_dir / "job.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    first = json.loads((run_dir / "job.json").read_text())["job_id"]
    waiter.send_signal(signal.SIGKILL)
    waiter.wait()
    proc = subprocess.run(_cli(cfg_file, run_dir), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"re-attaching to SLURM job {first}" in proc.stderr
    assert json.loads((run_dir / "job.json").read_text())["job_id"] == first
    assert len(list((run_dir / "jobs").iterdir())) == 1  # one submission
    assert _sacct_jobs("scm-teacher-tS").count(first) == 1
