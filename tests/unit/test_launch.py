"""Launching: cluster profiles, the generated sbatch script (golden file), local timeout -> requeue."""

import os
import sys
from pathlib import Path

import pytest

from scm import config as C
from scm.launch import ClusterProfile, get_profile, launch, load_profiles, sbatch_script

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden" / "sbatch_gpu2x8.sh"


def test_sbatch_script_for_2_nodes_x_8_gpus_matches_golden_file():
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


def test_profiles_reject_unknown_keys(tmp_path):
    bad = tmp_path / "clusters.yaml"
    bad.write_text("mine:\n  partition: gpu\n  gpus: 4\n")
    with pytest.raises(C.ConfigError, match=r"clusters.yaml: profile 'mine' has unknown keys \['gpus'\]"):
        load_profiles(bad)
    with pytest.raises(C.ConfigError, match="no cluster profile 'nope'"):
        get_profile(ROOT / "config" / "clusters.yaml", "nope")


@pytest.mark.slow
def test_local_timeout_checkpoints_requeues_and_completes(tmp_path):
    cfg = C.resolve_from_dict({"dataset": "shapes", "size": "tS", "method": "sct",
                               "data": {"num_images": 256}, "network": {"model_channels": 8},
                               "run": {"batch_size": 16, "total_kimg": 1.28, "checkpoint_kimg": 100.0,
                                       "log_kimg": 0.16}})
    # USR2 arrives 12 s after each start: the job checkpoints, submitit requeues it, it resumes.
    # (submitit's local controller restarts a job at most 6 times.)
    profile = ClusterProfile(time_min=0.5, signal_delay_s=18, max_requeues=6)
    status = launch(cfg, tmp_path, "local", profile, poll_s=0.5)
    assert status["state"] == "completed" and status["step"] == 80
    logs = "\n".join(p.read_text() for p in tmp_path.glob("jobs/*/*.err"))
    assert "preemption checkpoint" in logs and "resumed from" in logs


@pytest.mark.slow
def test_data_parallel_over_two_local_tasks(tmp_path):
    # Two tasks: torch.distributed (gloo) from submitit's job environment, DDP, each rank half the batch.
    cfg = C.resolve_from_dict({"dataset": "shapes", "size": "tS", "method": "sct",
                               "data": {"num_images": 256}, "network": {"model_channels": 8},
                               "run": {"batch_size": 16, "total_kimg": 0.32, "log_kimg": 0.16}})
    status = launch(cfg, tmp_path, "local", ClusterProfile(tasks_per_node=2, time_min=5), poll_s=0.5)
    assert status["state"] == "completed" and status["step"] == 20
    logs = {p.name: p.read_text() for p in tmp_path.glob("jobs/*/*_log.err")}
    assert any(name.endswith("_1_log.err") for name in logs), sorted(logs)
    assert "world size 2" in "\n".join(logs.values())


@pytest.mark.slow
def test_failed_job_error_carries_the_log_tail(tmp_path):
    # sCD without a finished teacher fails inside the job; the waiting side shows the job's last log lines
    from scm.launch import LaunchError

    cfg = C.resolve_from_dict({"dataset": "shapes", "size": "tS", "method": "scd",
                               "run": {"teacher_run_dir": str(tmp_path / "no-teacher")}})
    with pytest.raises(LaunchError) as err:
        launch(cfg, tmp_path / "run", "local", ClusterProfile(time_min=5), poll_s=0.5)
    text = str(err.value)
    assert "--- last lines of" in text and "TeacherNotReadyError" in text and "no-teacher" in text
