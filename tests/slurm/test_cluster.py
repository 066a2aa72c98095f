"""The test SLURM cluster works: jobs run and reach accounting, fake GPUs, requeue."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout


def sbatch(*args: str) -> str:
    # --parsable prints "ID" or "ID;cluster".
    return run("sbatch", "--parsable", *args).strip().split(";")[0]


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def sacct_state(job_id: str) -> str:
    return run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State").strip()


def wait_completed(job_id: str, timeout: float = 40) -> None:
    wait_until(lambda: sacct_state(job_id) == "COMPLETED", timeout, f"job {job_id} COMPLETED")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_job_runs_and_reaches_accounting(slurm_cluster, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    job_id = sbatch("-J", "scm-hello", "-o", str(out), "--wrap", "echo hello-from-slurm")
    wait_completed(job_id)
    assert out.read_text().strip() == "hello-from-slurm"


def test_gpu_gres_sets_cuda_visible_devices(slurm_cluster, tmp_path: Path) -> None:
    out = tmp_path / "gpu.txt"
    job_id = sbatch(
        "-J", "scm-gpu", "--gres=gpu:1", "-o", str(out),
        "--wrap", 'echo "CVD=${CUDA_VISIBLE_DEVICES:-unset}"',
    )  # fmt: skip
    wait_completed(job_id)
    assert out.read_text().strip() in {"CVD=0", "CVD=1"}


def test_requeue_runs_the_job_again(slurm_cluster, tmp_path: Path) -> None:
    counter = tmp_path / "counter.txt"
    script = tmp_path / "job.sh"
    # Each start appends a line, then sleeps long enough to be requeued while running.
    script.write_text(f'#!/bin/bash\necho "start restart=$SLURM_RESTART_COUNT" >> {counter}\nsleep 60\n')
    job_id = sbatch("-J", "scm-requeue", "--requeue", "-o", str(tmp_path / "job.out"), str(script))
    try:
        wait_until(lambda: len(lines(counter)) >= 1, 30, "first start")
        run("scontrol", "requeue", job_id)
        # AuthInfo=cred_expire=10 lets the requeued job start again after about 10 s; on a busy machine the
        # scheduler's next pass can take much longer (a fresh clone once needed more than 40 s), so wait 120 s.
        wait_until(lambda: len(lines(counter)) >= 2, 120, "restart after requeue")
        assert lines(counter) == ["start restart=", "start restart=1"]
    finally:
        subprocess.run(["scancel", job_id], check=False, timeout=30)
    wait_until(lambda: sacct_state(job_id).startswith("CANCELLED"), 30, f"job {job_id} cancelled")
