"""Launching training through submitit: debug (in-process), local (subprocess) or slurm.

- Resources come from a named cluster profile (config/clusters.yaml): partition, nodes, tasks and
  GPUs per node, CPUs, memory, time, account, qos, extra sbatch parameters, setup lines.
- TrainJob is Checkpointable: on timeout or preemption (USR2) it saves a checkpoint, is requeued and
  resumes from its run directory. A plain `scontrol requeue` sends no signal: the restarted job
  resumes from the newest periodic checkpoint.
- The job id is stored in RUN_DIR/job.json: a restarted waiting process re-attaches to a job that is
  still pending or running instead of submitting a duplicate.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
import yaml

from scm import config as C
from scm.checkpoint import atomic_write_json, read_status

log = logging.getLogger(__name__)

LAUNCHERS = ("debug", "local", "slurm")
ACTIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                       "COMPLETING", "RESIZING", "SUSPENDED", "UNKNOWN"}


class LaunchError(RuntimeError):
    """A job that failed; the message carries the tail of its log."""


# ----------------------------------------------------------------------------
# Cluster profiles.


@dataclass
class ClusterProfile:
    partition: str = ""
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: float = 4.0
    time_min: float = 60.0  # SLURM rounds up to whole minutes; local accepts fractions (tests)
    account: str = ""
    qos: str = ""
    sbatch_extra: dict = field(default_factory=dict)
    setup: list = field(default_factory=list)
    signal_delay_s: int = 120
    max_requeues: int = 3


def load_profiles(path: str | Path) -> dict[str, ClusterProfile]:
    """{name: ClusterProfile} from a YAML file; unknown keys are errors naming the file and profile."""
    path = Path(path)
    if not path.exists():
        raise C.ConfigError(f"cluster profiles file {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in dataclasses.fields(ClusterProfile)}
    out = {}
    for name, values in raw.items():
        bad = sorted(set(values or {}) - known)
        if bad:
            raise C.ConfigError(f"{path}: profile {name!r} has unknown keys {bad}; known: {sorted(known)}")
        out[name] = ClusterProfile(**(values or {}))
    return out


def get_profile(path: str | Path, name: str) -> ClusterProfile:
    profiles = load_profiles(path)
    if name not in profiles:
        raise C.ConfigError(f"{path}: no cluster profile {name!r}; known: {sorted(profiles)}")
    return profiles[name]


def make_executor(launcher: str, folder: str | Path, profile: ClusterProfile, job_name: str = "scm"):
    """A submitit executor for local or slurm; slurm parameters come from the profile.

    (The debug launcher runs train() in-process directly: submitit's DebugExecutor drops into pdb
    on any failure, which would hang a non-interactive pipeline.)"""
    folder = Path(folder)
    if launcher == "local":
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=profile.max_requeues)
        ex.update_parameters(timeout_min=profile.time_min, tasks_per_node=profile.tasks_per_node,
                             gpus_per_node=profile.gpus_per_node, signal_delay_s=profile.signal_delay_s)
        return ex
    if launcher == "slurm":
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=profile.max_requeues)
        params: dict[str, Any] = {
            "job_name": job_name, "time": math.ceil(profile.time_min), "nodes": profile.nodes,
            "ntasks_per_node": profile.tasks_per_node, "cpus_per_task": profile.cpus_per_task,
            "mem": f"{int(profile.mem_gb * 1024)}M", "signal_delay_s": profile.signal_delay_s,
            "setup": list(profile.setup), "additional_parameters": dict(profile.sbatch_extra),
        }
        if profile.gpus_per_node:
            params["gpus_per_node"] = profile.gpus_per_node
        for key in ("partition", "account", "qos"):
            if getattr(profile, key):
                params[key] = getattr(profile, key)
        ex.update_parameters(**params)
        return ex
    raise C.ConfigError(f"launcher: unknown {launcher!r}; choose one of {list(LAUNCHERS)}")


def sbatch_script(profile: ClusterProfile, folder: str | Path, job_name: str = "scm") -> str:
    """The sbatch script submitit would submit for this profile (for --dry-run and golden tests)."""
    ex = make_executor("slurm", folder, profile, job_name)
    return ex._make_submission_file_text(ex._submitit_command_str, "%j")


# ----------------------------------------------------------------------------
# The job: Checkpointable training.


def _init_distributed() -> None:
    """torch.distributed from submitit's job environment when there are several tasks."""
    import torch

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1 or torch.distributed.is_initialized():
        return
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    torch.distributed.init_process_group(backend=backend)


class TrainJob(submitit.helpers.Checkpointable):
    """Runs scm.train.train(cfg, run_dir); on USR2 saves a checkpoint and asks to be requeued."""

    def __init__(self, cfg: dict, run_dir: str, on_config_change: str = "error"):
        self.cfg, self.run_dir, self.on_config_change = cfg, run_dir, on_config_change

    def __call__(self) -> dict:
        from scm.train import train

        # The job's entry point: show the library's progress messages in the job log.
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

        try:
            _init_distributed()
        except RuntimeError:  # not inside a submitit job (direct call)
            pass
        return train(C.from_dict(self.cfg), self.run_dir, on_config_change=self.on_config_change)

    def checkpoint(self, *args, **kwargs):
        from scm.train import request_checkpoint

        request_checkpoint()
        return super().checkpoint(*args, **kwargs)


# ----------------------------------------------------------------------------
# Submit or re-attach, then wait.


def _tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not Path(path).exists():
        return "(no log file)"
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def _reattach(run_dir: Path):
    """The job recorded in job.json if SLURM still has it pending or running; else None."""
    info_path = run_dir / "job.json"
    if not info_path.exists():
        return None
    info = json.loads(info_path.read_text())
    if info.get("launcher") != "slurm":
        return None
    job = submitit.SlurmJob(folder=info["folder"], job_id=str(info["job_id"]))
    state = job.state
    if state in ACTIVE_SLURM_STATES:
        log.info("re-attaching to SLURM job %s (%s) from %s", info["job_id"], state, info_path)
        return job
    return None


def submit(cfg: C.Config, run_dir: str | Path, launcher: str = "local", profile: ClusterProfile | None = None,
           on_config_change: str = "error"):
    """Submit training (or re-attach to the job already running for run_dir); returns the submitit job."""
    from scm.train import prepare_run_dir

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if prepare_run_dir(cfg, run_dir, on_config_change).get("state") == "completed":
        raise LaunchError(f"{run_dir} is already completed; nothing to submit")
    profile = profile or ClusterProfile()
    job = _reattach(run_dir) if launcher == "slurm" else None
    if job is not None:
        return job
    # A fresh submitit folder per submission: SLURM job ids restart after a cluster reset (stack-notes).
    folder = run_dir / "jobs" / time.strftime("%Y%m%d-%H%M%S")
    folder = folder.with_name(f"{folder.name}-{os.getpid()}")
    ex = make_executor(launcher, folder, profile, job_name=f"scm-{cfg.run.method}-{cfg.run.size}")
    job = ex.submit(TrainJob(C.to_dict(cfg), str(run_dir), on_config_change))
    atomic_write_json(run_dir / "job.json", {"job_id": str(job.job_id), "launcher": launcher,
                                             "folder": str(folder), "submitted": time.time()})
    log.info("submitted %s job %s for %s", launcher, job.job_id, run_dir)
    return job


def wait(job, run_dir: str | Path, poll_s: float = 5.0) -> dict:
    """Wait for the job; a failure raises LaunchError with the tail of the job's log."""
    try:
        if hasattr(job, "_poll_frequency"):
            job._poll_frequency = poll_s
        results = job.results()  # one per task; rank 0's is the run's
        result = results[0] if results else None
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
        paths = getattr(job, "paths", None)
        log_path = paths.stderr if paths else None
        raise LaunchError(f"job {job.job_id} for {run_dir} failed: {str(e).splitlines()[0] if str(e) else e}\n"
                          f"--- last lines of {log_path} ---\n{_tail(log_path)}") from None
    return result if isinstance(result, dict) else read_status(Path(run_dir))


def launch(cfg: C.Config, run_dir: str | Path, launcher: str = "local", profile: ClusterProfile | None = None,
           poll_s: float = 5.0, on_config_change: str = "error") -> dict:
    """Submit (or re-attach) and wait; returns the run's final status (at once for a completed run)."""
    from scm.train import prepare_run_dir, train

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    status = prepare_run_dir(cfg, run_dir, on_config_change)
    if status.get("state") == "completed":
        return status
    if launcher == "debug":
        return train(cfg, run_dir, on_config_change=on_config_change)
    job = submit(cfg, run_dir, launcher, profile, on_config_change)
    return wait(job, run_dir, poll_s)
