"""Launching: cluster profiles, the generated sbatch script (golden file), local preemption -> requeue."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scm.config import Config, ConfigError, resolve_from_dict, to_dict
from scm.launch import ClusterProfile, get_profile, launch, load_profiles, sbatch_script

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden" / "sbatch_gpu2x8.sh"
SLURM_PROGRAMS = {"salloc", "sacct", "sacctmgr", "sattach", "sbatch", "sbcast", "scancel", "scontrol", "sinfo",
                  "squeue", "srun", "sshare", "sstat"}


def path_without_slurm(tmp_path: Path) -> str:
    """PATH as on a machine without SLURM: a folder that holds SLURM programs is replaced by a folder
    of links to everything else in it."""
    out = []
    for i, d in enumerate(os.environ.get("PATH", "").split(os.pathsep)):
        if not d or not Path(d).is_dir():
            continue
        names = set(os.listdir(d))
        if not names & SLURM_PROGRAMS:
            out.append(d)
            continue
        shim = tmp_path / f"no-slurm-{i}"
        shim.mkdir()
        for name in names - SLURM_PROGRAMS:
            (shim / name).symlink_to(Path(d) / name)
        out.append(str(shim))
    return os.pathsep.join(out)


@pytest.fixture
def no_slurm(tmp_path, monkeypatch):
    path = path_without_slurm(tmp_path)
    import shutil

    assert all(shutil.which(prog, path=path) is None for prog in SLURM_PROGRAMS)
    monkeypatch.setenv("PATH", path)
    return path


def test_sbatch_script_for_2_nodes_x_8_gpus_matches_golden_file(no_slurm):
    # written on a laptop: no SLURM program on PATH
    profile = get_profile(ROOT / "config" / "clusters.yaml", "gpu2x8")
    # a hostile folder: spaces and a quote must survive shell quoting
    text = sbatch_script(profile, "/shared/runs/it's a run/jobs", job_name="scm-scd-XL")
    text = text.replace(sys.executable, "PYTHON")
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR2@120", "#SBATCH --account=my-account", "module load cuda/12.4"):
        assert line in text


def test_dry_run_writes_the_sbatch_script_without_slurm_installed(no_slurm, tmp_path):
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text("dataset: shapes\nsize: tS\nmethod: teacher\n")
    proc = subprocess.run([sys.executable, "-m", "scm.cli", "train", "--config", str(cfg_file), "--run-dir",
                           str(tmp_path / "run"), "--launcher", "slurm", "--cluster", "gpu2x8", "--clusters",
                           str(ROOT / "config" / "clusters.yaml"), "--dry-run"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PATH": no_slurm})
    assert proc.returncode == 0, proc.stderr
    assert "# sbatch script" in proc.stdout and "#SBATCH --nodes=2" in proc.stdout
    assert "srun --unbuffered" in proc.stdout  # the script runs srun on the cluster, not here
    assert not (tmp_path / "run").exists()


def test_submitting_to_slurm_without_slurm_is_one_clear_error(no_slurm, tmp_path):
    from scm.launch import LaunchError, make_executor

    with pytest.raises(LaunchError, match="launcher slurm: sbatch and srun not found on PATH"):
        make_executor("slurm", tmp_path, ClusterProfile())


def test_profiles_reject_unknown_keys(tmp_path):
    bad = tmp_path / "clusters.yaml"
    bad.write_text("mine:\n  partition: gpu\n  gpus: 4\n")
    with pytest.raises(ConfigError, match=r"clusters.yaml: profile 'mine' has unknown keys \['gpus'\]"):
        load_profiles(bad)
    with pytest.raises(ConfigError, match="no cluster profile 'nope'"):
        get_profile(ROOT / "config" / "clusters.yaml", "nope")


def _wait_for(predicate, what: str, timeout_s: float = 300):
    # A deadline only bounds a failing test; a passing one never waits for a fixed time.
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if (value := predicate()):
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_local_timeout_checkpoints_requeues_and_completes(tmp_path):
    from scm.checkpoint import list_checkpoints, read_status
    from scm.launch import submit, wait

    cfg = resolve_from_dict({"dataset": "shapes", "size": "tS", "method": "sct", "data": {"num_images": 256},
                             "network": {"model_channels": 8, "num_blocks": 1, "channel_mult": [1, 2],
                                         "attn_resolutions": [8]},
                             "run": {"batch_size": 16, "total_kimg": 0.64, "checkpoint_kimg": 0.16,
                                     "log_kimg": 0.16}})
    # The USR2 that SLURM/submitit send before a time limit, sent by the test at a chosen point (the
    # first periodic checkpoint), not by a clock: independent of the machine's speed. The trainer is
    # stopped while the signal is queued so that it cannot finish first.
    job = submit(cfg, tmp_path, "local", ClusterProfile(time_min=60, max_requeues=3))
    _wait_for(lambda: list_checkpoints(tmp_path), "the first checkpoint")
    pid = read_status(tmp_path)["pid"]
    os.kill(pid, signal.SIGSTOP)
    assert read_status(tmp_path)["step"] < 40
    os.kill(pid, signal.SIGUSR2)
    os.kill(pid, signal.SIGCONT)
    status = wait(job, tmp_path, poll_s=0.5)
    assert status["state"] == "completed" and status["step"] == 40
    logs = "\n".join(p.read_text() for p in tmp_path.glob("jobs/*/*.err"))
    assert "Requeued job" in logs and "resumed from" in logs
    # a USR2 inside the optimizer update keeps the last periodic checkpoint instead of saving one
    assert "preemption checkpoint" in logs or "preempted while updating weights" in logs
    steps = [json.loads(line)["step"] for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert steps == list(range(10, 41, 10))


@pytest.mark.slow
def test_data_parallel_over_two_local_tasks(tmp_path):
    # Two tasks: torch.distributed (gloo) from submitit's job environment, DDP, each rank half the batch.
    cfg = resolve_from_dict({"dataset": "shapes", "size": "tS", "method": "sct",
                             "data": {"num_images": 256}, "network": {"model_channels": 8},
                             "run": {"batch_size": 16, "total_kimg": 0.32, "log_kimg": 0.16}})
    status = launch(cfg, tmp_path, "local", ClusterProfile(tasks_per_node=2, time_min=5), poll_s=0.5)
    assert status["state"] == "completed" and status["step"] == 20
    logs = {p.name: p.read_text() for p in tmp_path.glob("jobs/*/*_log.err")}
    assert any(name.endswith("_1_log.err") for name in logs), sorted(logs)
    assert "world size 2" in "\n".join(logs.values())


def _fake_teacher(teacher_dir: Path, cfg: Config, payload: bytes) -> None:
    """A teacher run that looks finished: config, status 'completed', a final.pt with a valid header."""
    import hashlib

    from scm.checkpoint import MAGIC, write_status
    from scm.fileio import atomic_write_json

    teacher_dir.mkdir(parents=True)
    atomic_write_json(teacher_dir / "config.json", to_dict(cfg))
    (teacher_dir / "final.pt").write_bytes(MAGIC + hashlib.sha256(b"the real payload").digest() + payload)
    write_status(teacher_dir, "completed", step=8)


def test_scd_without_a_finished_teacher_fails_before_submitting(tmp_path):
    from scm.train import TeacherNotReadyError

    cfg = resolve_from_dict({"dataset": "shapes", "size": "tS", "method": "scd",
                             "run": {"teacher_run_dir": str(tmp_path / "no-teacher")}})
    with pytest.raises(TeacherNotReadyError, match="teacher .*no-teacher not found"):
        launch(cfg, tmp_path / "run", "local", ClusterProfile(time_min=5), poll_s=0.5)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_failed_job_error_carries_the_log_tail(tmp_path):
    # a teacher whose final.pt header is intact but whose payload is not: the job fails loading it,
    # and the waiting side shows the job's last log lines
    from scm.launch import LaunchError

    teacher = resolve_from_dict({"dataset": "shapes", "size": "tS", "method": "teacher"})
    _fake_teacher(tmp_path / "teacher", teacher, b"not the payload")
    cfg = resolve_from_dict({"dataset": "shapes", "size": "tS", "method": "scd",
                             "run": {"teacher_run_dir": str(tmp_path / "teacher")}})
    with pytest.raises(LaunchError) as err:
        launch(cfg, tmp_path / "run", "local", ClusterProfile(time_min=5), poll_s=0.5)
    text = str(err.value)
    assert "--- last lines of" in text and "FinalCorruptError" in text
    assert str(tmp_path / "teacher" / "final.pt") in text and "checksum mismatch" in text
