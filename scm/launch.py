"""Launching training through submitit: debug (in-process), local (subprocess) or slurm.

- Resources come from a named cluster profile (config/clusters.yaml): partition, nodes, tasks and
  GPUs per node, CPUs, memory, time, account, qos, extra sbatch parameters, setup lines.
- TrainJob is Checkpointable: on timeout or preemption (USR2) it saves a checkpoint, is requeued and
  resumes from its run directory. A plain `scontrol requeue` sends no signal: the restarted job
  resumes from the newest periodic checkpoint.
- The job id is stored in RUN_DIR/job.json: a restarted waiting process re-attaches to a job that is
  still pending or running (SLURM: its state; local: its controller process) instead of submitting a
  duplicate. Submission happens holding the run lock, so two waiting processes submit one job.
- Writing the sbatch script (--dry-run, golden test) needs no SLURM programs; submitting does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from scm.checkpoint import RunLock, pid_alive, read_status
from scm.config import Config, ConfigError, load_yaml
from scm.fileio import atomic_write_json

log = logging.getLogger(__name__)

LAUNCHERS = ("debug", "local", "slurm")
ACTIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                       "COMPLETING", "RESIZING", "SUSPENDED", "UNKNOWN"}


class LaunchError(RuntimeError):
    """A job that failed; the message carries the tail of its log."""


class AlreadyCompleted(LaunchError):
    """submit() found the run completed (perhaps by a trainer it waited for): nothing to submit."""


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
        raise ConfigError(f"cluster profiles file {path} not found")
    raw = load_yaml(path, "--clusters")
    known = {f.name for f in dataclasses.fields(ClusterProfile)}
    out = {}
    for name, values in raw.items():
        bad = sorted(set(values or {}) - known)
        if bad:
            raise ConfigError(f"{path}: profile {name!r} has unknown keys {bad}; known: {sorted(known)}")
        out[name] = ClusterProfile(**(values or {}))
    return out


def get_profile(path: str | Path, name: str) -> ClusterProfile:
    profiles = load_profiles(path)
    if name not in profiles:
        raise ConfigError(f"{path}: no cluster profile {name!r}; known: {sorted(profiles)}")
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
        missing = [prog for prog in ("sbatch", "srun") if shutil.which(prog) is None]
        if missing:
            raise LaunchError(f"launcher slurm: {' and '.join(missing)} not found on PATH (not a SLURM machine?); "
                              "use --launcher local or debug here, or --dry-run to write the sbatch script")
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=profile.max_requeues)
        ex.update_parameters(**_slurm_parameters(profile, job_name))
        return ex
    raise ConfigError(f"launcher: unknown {launcher!r}; choose one of {list(LAUNCHERS)}")


def _slurm_parameters(profile: ClusterProfile, job_name: str) -> dict[str, Any]:
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
    return params


class _ScriptOnlySlurmExecutor(submitit.SlurmExecutor):
    """A SlurmExecutor that only writes scripts: SlurmExecutor.__init__ refuses to exist where `srun` is
    not on PATH (it asks the public classmethod affinity()), but the script is plain text."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def sbatch_script(profile: ClusterProfile, folder: str | Path, job_name: str = "scm") -> str:
    """The sbatch script submitit would submit for this profile (for --dry-run and golden tests).

    Needs no SLURM installation. submitit has no public call that renders the script without
    submitting it, hence its private _make_submission_file_text / _submitit_command_str (the exact
    text `submit` would write, which is what the golden test pins)."""
    ex = _ScriptOnlySlurmExecutor(folder=Path(folder), max_num_timeout=profile.max_requeues)
    ex.update_parameters(**_slurm_parameters(profile, job_name))
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

    def __init__(self, cfg: Config, run_dir: str, on_config_change: str = "error"):
        self.cfg, self.run_dir, self.on_config_change = cfg, run_dir, on_config_change

    def __call__(self) -> dict:
        from scm.train import train

        # The job's entry point: show the library's progress messages in the job log.
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

        try:
            _init_distributed()
        except RuntimeError:  # not inside a submitit job (direct call)
            pass
        return train(self.cfg, self.run_dir, on_config_change=self.on_config_change)

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


class _ReattachedLocalJob(submitit.LocalJob):
    """A local job submitted by an earlier (killed) waiting process: followed through its controller's pid,
    since only the submitting process holds its Popen handle."""

    def get_info(self, mode: str = "force") -> dict[str, str]:
        if pid_alive(int(self.job_id)):
            return {"jobState": "RUNNING"}
        return {"jobState": "FINISHED" if self.paths.result_pickle.exists() else "INTERRUPTED"}


def _local_controller_alive(info: dict) -> bool:
    """Whether job.json's local job still runs here: its controller pid lives and runs that job folder."""
    if info.get("host") != platform.node() or not pid_alive(int(info["job_id"])):
        return False
    try:  # guard against a reused pid: the controller's command line names the job folder
        return info["folder"] in Path(f"/proc/{info['job_id']}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return True


def _reattach(run_dir: Path, launcher: str):
    """The job recorded in job.json if it is still pending or running; else None."""
    info_path = run_dir / "job.json"
    if not info_path.exists():
        return None
    info = json.loads(info_path.read_text())
    if info.get("launcher") != launcher:
        return None
    if launcher == "local":
        if not _local_controller_alive(info):
            return None
        log.info("re-attaching to local job %s (controller running) from %s", info["job_id"], info_path)
        return _ReattachedLocalJob(folder=info["folder"], job_id=str(info["job_id"]),
                                   tasks=list(range(info.get("tasks", 1))))
    job = submitit.SlurmJob(folder=info["folder"], job_id=str(info["job_id"]))
    state = job.state
    if state in ACTIVE_SLURM_STATES:
        log.info("re-attaching to SLURM job %s (%s) from %s", info["job_id"], state, info_path)
        return job
    return None


def submit(cfg: Config, run_dir: str | Path, launcher: str = "local", profile: ClusterProfile | None = None,
           on_config_change: str = "error"):
    """Submit training (or re-attach to the job already running for run_dir); returns the submitit job.

    Raises AlreadyCompleted when there is nothing to do (also after waiting for another trainer)."""
    from scm.train import check_teacher, final_fault, mismatch_error, run_dir_state

    upstream = check_teacher(cfg)  # bad input: before the run directory exists
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    profile = profile or ClusterProfile()
    job = _reattach(run_dir, launcher) if launcher in ("local", "slurm") else None
    if job is not None:
        return job
    # Judge and submit holding the run lock: a trainer running here (an orphan) is waited for first,
    # and a second waiting process finds the job.json this one writes.
    with RunLock(run_dir):
        job = _reattach(run_dir, launcher)
        if job is not None:
            return job
        # Judge only (the job's train() prepares the directory): a wrong run here fails before submitting.
        status, mismatch = run_dir_state(cfg, run_dir, upstream)
        if mismatch is not None and on_config_change != "restart":
            raise mismatch_error(run_dir, mismatch)
        if mismatch is None and status.get("state") == "completed":
            why = final_fault(run_dir)
            if why is None:
                raise AlreadyCompleted(f"{run_dir} is already completed; nothing to submit")
            log.warning("%s/final.pt is corrupt (%s): submitting to re-create it", run_dir, why)
        # A fresh submitit folder per submission: SLURM job ids restart after a cluster reset.
        folder = run_dir / "jobs" / time.strftime("%Y%m%d-%H%M%S")
        folder = folder.with_name(f"{folder.name}-{os.getpid()}")
        ex = make_executor(launcher, folder, profile, job_name=f"scm-{cfg.run.method}-{cfg.run.size}")
        job = ex.submit(TrainJob(cfg, str(run_dir), on_config_change))
        atomic_write_json(run_dir / "job.json", {"job_id": str(job.job_id), "launcher": launcher,
                                                 "folder": str(folder), "host": platform.node(),
                                                 "tasks": profile.tasks_per_node * profile.nodes,
                                                 "submitted": time.time()})
    log.info("submitted %s job %s for %s", launcher, job.job_id, run_dir)
    return job


def wait(job, run_dir: str | Path, poll_s: float = 5.0) -> dict:
    """Wait for the job; a failure raises LaunchError with the tail of the job's log."""
    try:
        while not job.done():  # our own polling interval (submitit's public API has no setting for it)
            time.sleep(poll_s)
        results = job.results()  # one per task; rank 0's is the run's
        result = results[0] if results else None
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
        paths = getattr(job, "paths", None)
        log_path = paths.stderr if paths else None
        raise LaunchError(f"job {job.job_id} for {run_dir} failed: {str(e).splitlines()[0] if str(e) else e}\n"
                          f"--- last lines of {log_path} ---\n{_tail(log_path)}") from None
    return result if isinstance(result, dict) else read_status(Path(run_dir))


def launch(cfg: Config, run_dir: str | Path, launcher: str = "local", profile: ClusterProfile | None = None,
           poll_s: float = 5.0, on_config_change: str = "error") -> dict:
    """Submit (or re-attach) and wait; returns the run's final status (at once for a completed run)."""
    from scm.train import train

    if launcher == "debug":
        return train(cfg, run_dir, on_config_change=on_config_change)
    try:
        job = submit(cfg, run_dir, launcher, profile, on_config_change)
    except AlreadyCompleted:
        return read_status(Path(run_dir))
    return wait(job, run_dir, poll_s)
