"""One training loop for the TrigFlow teacher, sCT and sCD (sCM Alg. 1; EDM2's habits).

Progress is counted in images (kimg). The run directory holds everything:

    config.json      the resolved config            run.json     hash, upstream, git commit, versions, job ids
    status.json      running/completed/failed/diverged/interrupted/requeued, with the reason, the
                     writer's pid/host/SLURM job id and a heartbeat (read_status says 'dead' for a lost run)
    stats.jsonl      one line per log interval      checkpoints/ the last K checkpoints
    final.pt         EMA and raw weights + config + upstream, written once the run completed
    lock             held (flock) by the one trainer of this directory; names it

Resume = call train() again with the same run directory: it loads the newest valid checkpoint
(model, EMA, optimizer, grad scaler, RNG states, data position) and continues bit-exactly.

A run's identity is its config hash plus what it was built from (sCD: the sha256 of the teacher's
final.pt): a run directory holding another identity is restarted or refused, never resumed. One
trainer per run directory (scm.checkpoint.RunLock); SIGTERM/SIGINT checkpoint at the next step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import random
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from scm.checkpoint import (
    HEARTBEAT_S,
    CheckpointError,
    RunLock,
    checkpoint_digest,
    checkpoint_path,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_status,
    save_checkpoint,
    verify_checkpoint,
    write_status,
)
from scm.config import Config, ConfigError, OptimConfig, RunConfig, config_hash, flatten, from_dict, to_dict
from scm.data import InfiniteLoader, build_dataset
from scm.ema import EMA
from scm.fileio import atomic_write_json
from scm.losses import build_loss
from scm.networks import build_network
from scm.tracking import make_tracker, sample_grid

log = logging.getLogger(__name__)


# The running train() call registers a function that saves a consistent checkpoint now (preemption).
_SAVE_NOW: Callable[[], Path | None] | None = None


def request_checkpoint() -> Path | None:
    """Called from submitit's USR2 handler (TrainJob.checkpoint): save the current state, if training."""
    return _SAVE_NOW() if _SAVE_NOW is not None else None


class DivergedError(RuntimeError):
    """NaN/Inf in the loss or gradients beyond run.max_bad_batches."""


class StopTraining(Exception):
    """Raised by an on_eval callback to end a run early (e.g. an Optuna trial pruned)."""


class TeacherNotReadyError(FileNotFoundError):
    """sCD was pointed at a teacher run that is missing or unfinished."""


class TeacherMismatchError(ConfigError):
    """sCD was pointed at a teacher whose network does not fit the student's."""


class FinalCorruptError(ValueError):
    """A completed run's final.pt fails its checksum (or cannot be read): training must re-create it."""


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT: a checkpoint was saved at a step boundary; running again resumes from it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# ----------------------------------------------------------------------------
# Run-directory metadata.


def _git_info() -> dict:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return {"commit": commit or None, "dirty": dirty if commit else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "scm-bench", "submitit", "snakemake", "torch-fidelity", "optuna"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def write_run_json(run_dir: Path, cfg: Config, upstream: dict | None = None) -> None:
    """run.json: resolved config and hash, what the run is built from (upstream), code version,
    environment; keeps job ids from earlier writes."""
    path = run_dir / "run.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    job_ids = old.get("slurm_job_ids", [])
    jid = os.environ.get("SLURM_JOB_ID")
    if jid and jid not in job_ids:
        job_ids.append(jid)
    atomic_write_json(path, {"config": to_dict(cfg), "config_hash": config_hash(cfg),
                             "upstream": upstream or {}, "git": _git_info(),
                             "versions": _versions(), "host": platform.node(), "slurm_job_ids": job_ids,
                             "started": old.get("started", time.time())})


# ----------------------------------------------------------------------------
# Teacher loading for sCD.


def load_final(run_dir: Path, which: str = "ema", device="cpu"):
    """(network, config) from a completed run's final.pt; which = 'ema' or 'net'."""
    run_dir = Path(run_dir)
    final = run_dir / "final.pt"
    status = read_status(run_dir)
    if not final.exists() or status.get("state") != "completed":
        raise TeacherNotReadyError(f"expected a completed run with {final} (status.json says "
                                   f"{status.get('state')!r}); train it first")
    try:
        state = load_checkpoint(final, map_location=device)
    except (CheckpointError, EOFError, RuntimeError, OSError) as e:
        raise FinalCorruptError(f"{final} is unusable ({e}); run `scm train` on {run_dir} again to "
                                "re-create it") from None
    cfg = from_dict(state["config"])
    net = build_network(cfg.network, cfg.data, cfg.sigma_d)
    net.load_state_dict(state[which])
    return net.to(device).eval(), cfg


def _is_exact_teacher(cfg: Config) -> bool:
    return cfg.run.teacher_run_dir.startswith("exact:")


def load_teacher(cfg: Config, device):
    """sCD's teacher F_pretrain: the EMA network of a finished run, or an exact velocity ('exact:SPEC')."""
    if _is_exact_teacher(cfg):
        from scm.exact import exact_teacher

        return exact_teacher(cfg.run.teacher_run_dir[len("exact:"):], cfg, device)
    teacher, _ = load_final(Path(cfg.run.teacher_run_dir), "ema", device)
    return teacher


def _saved_config(run_dir: Path) -> Config | None:
    """A run's config from its config.json, else from its final.pt or newest checkpoint."""
    if (run_dir / "config.json").exists():
        return from_dict(json.loads((run_dir / "config.json").read_text()))
    for path in [run_dir / "final.pt", *reversed([p for _, p in list_checkpoints(run_dir)])]:
        try:
            return from_dict(load_checkpoint(path)["config"]) if path.exists() else None
        except (CheckpointError, EOFError, RuntimeError, OSError, KeyError):
            continue
    return None


_ARCH_KEYS = ("data.resolution", "data.channels", "data.label_dim")


def _teacher_misfit(teacher: Config, student: Config) -> str | None:
    """Why the teacher's weights cannot initialize the student (shapes compared on the meta device)."""
    with torch.device("meta"):
        t_shapes = {k: v.shape for k, v in build_network(teacher.network, teacher.data, teacher.sigma_d)
                    .state_dict().items()}
        s_shapes = {k: v.shape for k, v in build_network(student.network, student.data, student.sigma_d)
                    .state_dict().items()}
    bad = [k for k in t_shapes if k not in s_shapes or s_shapes[k] != t_shapes[k]]
    if not bad:
        return None
    t_flat, s_flat = flatten(to_dict(teacher)), flatten(to_dict(student))
    keys = [k for k in t_flat if (k.startswith("network.") or k in _ARCH_KEYS) and t_flat[k] != s_flat.get(k)]
    if not keys:  # differs in no architecture key (another code version): name a tensor
        k = bad[0]
        return f"parameter {k} of shape {tuple(t_shapes[k])}, the student {tuple(s_shapes.get(k, ()))}"
    return (", ".join(f"{k} {t_flat[k]}" for k in keys) + ", the student has "
            + ", ".join(f"{k} {s_flat.get(k)}" for k in keys))


def check_teacher(cfg: Config) -> dict:
    """sCD: the teacher run is finished and fits the student; returns the run's upstream identity.

    Called before the student's run directory is touched, so bad input leaves nothing behind.
    The identity is the sha256 of the teacher's final.pt (from its header; loading verifies it)."""
    if cfg.run.method != "scd":
        return {}
    if not cfg.run.teacher_run_dir:
        raise ConfigError("run.teacher_run_dir: sCD needs the run directory of a finished teacher")
    if _is_exact_teacher(cfg):  # the spec string is the identity, and it is in the config hash
        return {}
    tdir = Path(cfg.run.teacher_run_dir)
    final = tdir / "final.pt"
    if not tdir.is_dir():
        raise TeacherNotReadyError(f"run.teacher_run_dir: teacher {tdir} not found (no {final}); train the "
                                   "teacher first")
    status = read_status(tdir)
    if status.get("state") != "completed" or not final.exists():
        raise TeacherNotReadyError(f"run.teacher_run_dir: teacher {tdir} is not finished (status.json says "
                                   f"{status.get('state')!r}, {final} {'exists' if final.exists() else 'missing'}"
                                   "); train it first")
    try:
        digest = checkpoint_digest(final)
    except (CheckpointError, OSError) as e:
        raise FinalCorruptError(f"run.teacher_run_dir: {e}; run `scm train` on {tdir} again to re-create it") \
            from None
    tcfg = _saved_config(tdir)
    if tcfg is not None and (why := _teacher_misfit(tcfg, cfg)):
        raise TeacherMismatchError(f"run.teacher_run_dir: teacher {tdir} (size {tcfg.run.size}) has {why} "
                                   f"(size {cfg.run.size})")
    return {"teacher_final_sha256": digest}


# ----------------------------------------------------------------------------
# Learning rate: EDM2's inverse square-root decay with a linear ramp-up.


def learning_rate(cfg: OptimConfig, step: int, cur_nimg: int) -> float:
    lr = cfg.lr
    if cfg.lr_ref_iters > 0:
        lr /= math.sqrt(max(step / cfg.lr_ref_iters, 1.0))
    if cfg.lr_rampup_kimg > 0:
        lr *= min(cur_nimg / (cfg.lr_rampup_kimg * 1000), 1.0)
    return lr


def _optimizer(cfg: OptimConfig, params):
    # Adam as one fused kernel, RAdam as multi-tensor (foreach) ops: the same update up to float rounding,
    # without a Python loop of ~10 ops per parameter tensor (the CPU nets are dominated by per-op overhead).
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
    if cfg.name == "radam":
        return torch.optim.RAdam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)
    raise ConfigError(f"optim.name: unknown {cfg.name!r}; choose adam or radam", key="optim.name")


def grad_norm_and_clip(params, max_norm: float) -> float:
    """The global L2 norm of the gradients, scaled by max_norm / (norm + 1e-6) where that is < 1: the same as
    torch.nn.utils.clip_grad_norm_, in multi-tensor ops and without its no-op scaling when nothing is clipped."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item()
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_(grads, coef)
    return total


def _device(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: 'cuda' requested but no CUDA device is available")
    return torch.device(cfg.device)


def _rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _StopSignals:
    """SIGTERM/SIGINT -> stop at the next step boundary (the loop checkpoints there); a second one
    interrupts at once. Installed only in the main thread, and not in SLURM jobs, where submitit owns
    the signals (USR2 checkpoints and requeues; SIGTERM is bypassed)."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s: stopping at the next step boundary (again to stop at once)", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------
# Entry point and setup.


def train(cfg: Config, run_dir: str | Path, progress: Callable[[dict], None] | None = None,
          stop_after_steps: int | None = None, on_config_change: str = "error",
          on_eval: Callable[[int, float, torch.nn.Module], None] | None = None, wait: bool = True) -> dict:
    """Train cfg.run.method in run_dir until cfg.run.total_kimg; resumable; returns the final status.

    progress(info) is called after every step with {step, total_steps, kimg, loss, ...} (the CLI draws
    the bar). stop_after_steps ends the call early (tests, preemption drills) without completing.
    on_config_change: 'error' (default) or 'restart' when run_dir holds a run of another config or
    teacher. on_eval(step, kimg, ema_model) is called every run.eval_kimg (sweeps report intermediate
    FIDs); it may raise StopTraining to end the run early (status 'stopped').
    Another live trainer on run_dir: wait for it, then go on from what it left (wait=False: raise
    RunLockedError naming it). SIGTERM/SIGINT: checkpoint, status 'interrupted', TrainingInterrupted.
    """
    # Bad input fails before the run directory is touched.
    upstream = check_teacher(cfg)
    device = _device(cfg.run)
    if cfg.run.precision == "fp16" and device.type != "cuda":
        raise ConfigError("run.precision: fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rank, world = _dist()
    lock = RunLock(run_dir)
    if rank == 0:  # one trainer per run directory (all ranks of one job count as one)
        lock.acquire(wait=wait)
    try:
        return _train(cfg, run_dir, device, rank, world, upstream, progress, stop_after_steps, on_config_change,
                       on_eval)
    finally:
        lock.release()


def _train(cfg, run_dir, device, rank, world, upstream, progress, stop_after_steps, on_config_change, on_eval):
    if rank == 0:
        prepare_run_dir(cfg, run_dir, on_config_change, upstream)
    if world > 1:  # the other ranks read what rank 0 left (a restart clears the directory)
        torch.distributed.barrier()
    done = read_status(run_dir, raw=True)
    if done.get("state") == "completed" and (run_dir / "final.pt").exists():
        log.info("%s: already completed", run_dir)
        return done  # idempotent: a completed run is not trained again
    log.info("training %s %s in %s (rank %d, world size %d)", cfg.run.method, cfg.run.size, run_dir, rank, world)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if rank == 0:
        atomic_write_json(run_dir / "config.json", to_dict(cfg))
        write_run_json(run_dir, cfg, upstream)
        write_status(run_dir, "running", step=None)
    with _StopSignals() as stop:
        try:
            return _loop(cfg, run_dir, device, rank, world, upstream, progress, stop_after_steps, on_eval, stop)
        except DivergedError as e:
            if rank == 0:
                write_status(run_dir, "diverged", step=getattr(e, "step", _LAST_STEP.get("step")), reason=str(e),
                             last_checkpoint=getattr(e, "last_checkpoint", None))
            raise
        except StopTraining as e:
            if rank == 0:
                write_status(run_dir, "stopped", step=_LAST_STEP.get("step"), reason=str(e))
            raise
        except TrainingInterrupted as e:
            if rank == 0:
                write_status(run_dir, "interrupted", step=getattr(e, "step", None), reason=str(e))
            raise
        except SystemExit:  # submitit requeues a preempted/timed-out job by exiting: the run goes on later
            if rank == 0:
                write_status(run_dir, "requeued", step=_LAST_STEP.get("step"),
                             reason="interrupted: requeued by the launcher")
            raise
        except KeyboardInterrupt:
            if rank == 0:
                write_status(run_dir, "failed", step=_LAST_STEP.get("step"),
                             reason="interrupted by the user (run again to resume)")
            raise
        except BaseException as e:
            if rank == 0:
                write_status(run_dir, "failed", step=_LAST_STEP.get("step"), reason=f"{type(e).__name__}: {e}")
            raise


# The step the running loop reached (for the status written when it ends by an exception).
_LAST_STEP: dict = {}


@dataclasses.dataclass
class _Parts:
    """What a training step needs, built from the config."""
    net: torch.nn.Module           # the trained network (its state is checkpointed)
    ddp_net: torch.nn.Module       # net, wrapped for data parallelism when world > 1
    ema: EMA
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler   # active with fp16 only
    amp_dtype: torch.dtype | None  # autocast dtype (None: fp32)
    loss_fn: Callable


def _build(cfg: Config, device, world: int) -> _Parts:
    """Networks, EMA, optimizer and loss. sCD starts from the teacher's EMA weights and distills from that
    EMA copy (sCM Sec. 5, initialization from the pretrained diffusion model)."""
    torch.manual_seed(cfg.run.seed)
    net = build_network(cfg.network, cfg.data, cfg.sigma_d, device).to(device)
    teacher = None
    if cfg.run.method == "scd":
        teacher = load_teacher(cfg, device)
        if isinstance(teacher, torch.nn.Module):
            teacher.requires_grad_(False)
        if not _is_exact_teacher(cfg):  # an exact teacher has no weights: the student starts from its init
            missing, unexpected = net.load_state_dict(teacher.state_dict(), strict=False)
            if unexpected:
                raise TeacherMismatchError(f"run.teacher_run_dir: teacher weights do not fit the student: "
                                           f"{unexpected[:5]}")
            if missing:
                log.info("student parameters not in the teacher (kept at init): %s", missing)
    ddp_net = net
    if world > 1:
        ddp_net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=not cfg.loss.adaptive_weighting)
    return _Parts(net=net, ddp_net=ddp_net, ema=EMA(net, cfg.ema), opt=_optimizer(cfg.optim, net.parameters()),
                  scaler=torch.amp.GradScaler(device.type, enabled=cfg.run.precision == "fp16"),
                  amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.run.precision),
                  loss_fn=build_loss(cfg.run.method, cfg.loss, cfg.sigma_d, teacher))


@dataclasses.dataclass(frozen=True)
class _Schedule:
    """A run's kimg settings in whole steps of run.batch_size images."""
    batch: int
    total_steps: int
    ckpt_every: int
    log_every: int
    eval_every: int  # 0: no on_eval calls


def _schedule(cfg: RunConfig) -> _Schedule:
    batch = cfg.batch_size
    total_steps = max(1, math.ceil(cfg.total_kimg * 1000 / batch))
    return _Schedule(
        batch=batch, total_steps=total_steps,
        ckpt_every=max(1, round(cfg.checkpoint_kimg * 1000 / batch)) if cfg.checkpoint_kimg else total_steps,
        log_every=max(1, round(cfg.log_kimg * 1000 / batch)),
        eval_every=max(1, round(cfg.eval_kimg * 1000 / batch)) if cfg.eval_kimg > 0 else 0)


@dataclasses.dataclass
class _LoopState:
    """Where the loop stands; the preemption handler (request_checkpoint) reads it between any two statements.

    phase: 'compute' until the optimizer touches the weights, then 'commit', 'idle' between steps. During
    compute the weights are still those of `step`, so saving them with `start` (the data position and RNG
    states taken at the step's start) is exact; during the short commit phase we keep the last checkpoint.
    """
    step: int = 0
    bad_batches: int = 0
    last_ckpt: Path | None = None
    phase: str = "idle"
    start: tuple[dict, dict] | None = None


def _resume(cfg: Config, run_dir: Path, device, rank: int, upstream: dict, parts: _Parts,
            loader: InfiniteLoader) -> _LoopState:
    """Load the newest valid checkpoint (weights, EMA, optimizer, grad scaler, data position, RNG states);
    without one, seed this rank's random draws for a start from step 0."""
    found = latest_valid_checkpoint(run_dir, map_location=device)
    if found and _identity(found[1]) != _identity({"config": to_dict(cfg), "upstream": upstream}):
        # prepare_run_dir compared config.json/run.json; this is the weights' own record
        raise ConfigError(f"{found[0]} was trained under another config or teacher than {run_dir}/config.json "
                          "says; use a new run directory, or restart it (--on-config-change restart)")
    if not found:
        if list_checkpoints(run_dir):
            log.error("NO USABLE CHECKPOINT: all %d checkpoints in %s are corrupt (named above); restarting "
                      "from step 0", len(list_checkpoints(run_dir)), run_dir / "checkpoints")
        torch.manual_seed(cfg.run.seed + 1 + rank)
        return _LoopState()
    last_ckpt, state = found
    parts.net.load_state_dict(state["net"])
    parts.ema.load_state_dict(state["ema"])
    parts.opt.load_state_dict(state["optimizer"])
    parts.scaler.load_state_dict(state["scaler"])
    loader.load_state_dict(state["loader"])
    _set_rng_state(state["rng"], device)
    log.info("resumed from %s at step %d (%.1f kimg)", last_ckpt, state["step"],
             state["step"] * cfg.run.batch_size / 1000)
    return _LoopState(step=state["step"], bad_batches=state["bad_batches"], last_ckpt=last_ckpt)


class _Checkpoints:
    """This run's checkpoints: rank 0 writes them, every rank gets the path."""

    def __init__(self, cfg: Config, run_dir: Path, rank: int, device, parts: _Parts, loader: InfiniteLoader,
                 upstream: dict, loop: _LoopState):
        self.cfg, self.run_dir, self.rank, self.device = cfg, run_dir, rank, device
        self.parts, self.loader, self.upstream, self.loop = parts, loader, upstream, loop

    def save(self, at_step: int, loader_state=None, rng=None) -> Path:
        path = checkpoint_path(self.run_dir, at_step)
        if self.rank == 0:
            p = self.parts
            save_checkpoint(path, {"net": p.net.state_dict(), "ema": p.ema.state_dict(),
                                   "optimizer": p.opt.state_dict(), "scaler": p.scaler.state_dict(),
                                   "loader": loader_state or self.loader.state_dict(),
                                   "rng": rng or _rng_state(self.device), "step": at_step,
                                   "bad_batches": self.loop.bad_batches, "config": to_dict(self.cfg),
                                   "upstream": self.upstream})
            prune_checkpoints(self.run_dir, self.cfg.run.keep_checkpoints)
        return path

    def save_now(self) -> Path | None:
        """The preemption checkpoint (see _LoopState.phase); None while the weights are being updated."""
        loop = self.loop
        if loop.phase == "commit":
            log.warning("preempted while updating weights: resuming from %s", loop.last_ckpt)
            return None
        path = self.save(loop.step, *loop.start) if loop.phase == "compute" else self.save(loop.step)
        log.info("preemption checkpoint %s at step %d", path, loop.step)
        return path

    def save_final(self) -> None:
        """final.pt (what sCD, sampling and evaluation load), written by rank 0."""
        if self.rank == 0:
            p = self.parts
            save_checkpoint(self.run_dir / "final.pt", {"ema": p.ema.state_dict(), "net": p.net.state_dict(),
                                                        "config": to_dict(self.cfg), "upstream": self.upstream,
                                                        "step": self.loop.step})


# ----------------------------------------------------------------------------
# One training step.


def _train_step(cfg: Config, parts: _Parts, loader: InfiniteLoader, device, loop: _LoopState) -> dict:
    """One optimisation step (sCM Alg. 1): loss, backward, gradient norm and clip, optimizer step at the
    scheduled learning rate, EMA update; advances loop.step. Returns the step's record {lr, the loss's
    diagnostics, grad_norm}. A non-finite loss or gradient skips the update (loop.bad_batches counts it);
    beyond run.max_bad_batches it raises DivergedError naming the step and the last good checkpoint."""
    net, ema, opt, scaler = parts.net, parts.ema, parts.opt, parts.scaler
    step, batch = loop.step, cfg.run.batch_size
    # start before phase: a preemption that sees 'compute' must find this step's start, not the last one's
    loop.start = (loader.state_dict(), _rng_state(device))
    loop.phase = "compute"
    x0, labels = next(loader)
    x0 = x0.to(device)
    labels = labels.to(device) if cfg.data.label_dim else None
    cur_nimg = (step + 1) * batch
    lr = learning_rate(cfg.optim, step, cur_nimg)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=parts.amp_dtype, enabled=parts.amp_dtype is not None):
        loss, diag = parts.loss_fn(parts.ddp_net, x0, labels, step=step)
    scaler.scale(loss.float().mean()).backward()
    scaler.unscale_(opt)
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    grad_norm = grad_norm_and_clip(net.parameters(), max_norm)
    # NaN/Inf: skip up to max_bad_batches, then stop naming the step and the last good checkpoint.
    # (With fp16's grad scaler, inf gradients alone are routine: the scaler skips and rescales.)
    loop.phase = "commit"
    use_scaler = scaler.is_enabled()
    if not math.isfinite(diag["loss"]) or (not math.isfinite(grad_norm) and not use_scaler):
        loop.bad_batches += 1
        if loop.bad_batches > cfg.run.max_bad_batches:
            err = DivergedError(f"non-finite loss or gradient at step {step} (kimg {step * batch / 1000:.1f});"
                                f" last good checkpoint: {loop.last_ckpt or 'none'}")
            err.step, err.last_checkpoint = step, str(loop.last_ckpt)
            raise err
        log.warning("skipping non-finite batch at step %d (%d/%d)", step, loop.bad_batches,
                    cfg.run.max_bad_batches)
        opt.zero_grad(set_to_none=True)
        if use_scaler:
            scaler.update()
    else:
        scaler.step(opt)
        scaler.update()
        ema.update(net, cur_nimg, batch)
    # step before phase: a preemption that sees 'idle' saves the updated weights as the next step's
    loop.step += 1
    loop.phase = "idle"
    return {"lr": lr, **diag, "grad_norm": grad_norm}


# ----------------------------------------------------------------------------
# Bookkeeping around the steps.


def _stats_row(window: list[dict], step: int, batch: int, lr: float, elapsed: float, device,
               bad_batches: int) -> dict:
    """One stats.jsonl line: the means of a log window's step diagnostics, its speed and the peak memory."""
    row = {"step": step, "kimg": step * batch / 1000, "lr": lr,
           "sec_per_kimg": elapsed / (len(window) * batch / 1000),
           "peak_mem_mb": _peak_memory_mb(device), "bad_batches": bad_batches, "time": time.time()}
    for key in window[0]:
        row[key] = float(np.mean([w[key] for w in window]))
    row["grad_norm_max"] = float(np.max([w["grad_norm"] for w in window]))
    return row


class _StatsWindow:
    """The step records of one log interval; rank 0 writes them as a stats.jsonl row and to the tracker."""

    def __init__(self, run_dir: Path, rank: int, device, batch: int, tracker):
        self.path, self.rank, self.device, self.batch = run_dir / "stats.jsonl", rank, device, batch
        self.tracker = tracker
        self.records, self.t0 = [], time.perf_counter()

    def add(self, record: dict) -> None:
        # a row's lr is its last step's, not the window's mean
        self.records.append({k: v for k, v in record.items() if k != "lr"})

    def write(self, step: int, lr: float, bad_batches: int) -> None:
        row = _stats_row(self.records, step, self.batch, lr, time.perf_counter() - self.t0, self.device, bad_batches)
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.tracker.log(row, step)
        self.records, self.t0 = [], time.perf_counter()


def _heartbeat(run_dir: Path, step: int, log_every: int, last: float) -> float:
    """status.json names this process and says it is alive (every log interval or HEARTBEAT_S); returns
    the time of the last beat."""
    if step % log_every == 0 or time.monotonic() - last > HEARTBEAT_S:
        write_status(run_dir, "running", step=step)
        return time.monotonic()
    return last


def _track_grid(tracker, ema: EMA, cfg: Config, step: int) -> None:
    """A sample grid of the EMA model, for trackers that take images."""
    if tracker.wants_images:
        grid = sample_grid(ema.model, cfg)
        if grid is not None:
            tracker.image("samples/ema", grid, step)


def _evaluate(on_eval: Callable, parts: _Parts, step: int, batch: int) -> None:
    _LAST_STEP["step"] = step  # a StopTraining from on_eval ends the run at this step
    on_eval(step, step * batch / 1000, parts.ema.model)
    parts.net.train()


def _interrupted(signum: int, step: int, path: Path) -> TrainingInterrupted:
    """The error for a SIGTERM/SIGINT stop at a step boundary, naming the checkpoint saved there."""
    name = signal.Signals(signum).name
    err = TrainingInterrupted(f"{name}: stopped at step {step}, checkpoint {path}; run again to resume", signum)
    err.step = step
    return err


# ----------------------------------------------------------------------------
# The loop: setup, then a step and its bookkeeping until total_kimg, then final.pt.


def _loop(cfg, run_dir, device, rank, world, upstream, progress, stop_after_steps, on_eval, stop) -> dict:
    _LAST_STEP.clear()
    parts = _build(cfg, device, world)
    dataset = build_dataset(cfg.data, cfg.sigma_d)
    loader = InfiniteLoader(dataset, cfg.run.batch_size, seed=cfg.run.seed, rank=rank, world_size=world,
                            xflip=cfg.data.xflip)
    sched = _schedule(cfg.run)
    loop = _resume(cfg, run_dir, device, rank, upstream, parts, loader)
    if rank == 0:  # stats past the resumed step (0 without a checkpoint) will be written again
        _truncate_stats(run_dir / "stats.jsonl", loop.step)
    ckpts = _Checkpoints(cfg, run_dir, rank, device, parts, loader, upstream, loop)
    global _SAVE_NOW
    _SAVE_NOW = ckpts.save_now
    # Optional tracking (scm.tracking): mirrors the stats rows, plus sample grids at checkpoints.
    tracker = make_tracker(cfg.run.tracker if rank == 0 else "none", run_dir, cfg.run.tracker_project,
                           to_dict(cfg), resume_step=loop.step)
    parts.net.train()
    window = _StatsWindow(run_dir, rank, device, sched.batch, tracker)
    steps_this_call, t_heartbeat = 0, time.monotonic()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        while loop.step < sched.total_steps:
            _LAST_STEP["step"] = loop.step
            if stop.signum is not None:  # SIGTERM/SIGINT: keep everything up to this step boundary
                raise _interrupted(stop.signum, loop.step, ckpts.save(loop.step))
            if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                if rank == 0:
                    write_status(run_dir, "interrupted", step=loop.step, reason=f"stopped after {steps_this_call} "
                                 "steps (stop_after_steps); run again to resume")
                return read_status(run_dir)
            record = _train_step(cfg, parts, loader, device, loop)
            steps_this_call += 1
            # Bookkeeping: stats row, heartbeat, checkpoint, evaluation hook, progress.
            step = loop.step
            window.add(record)
            if step % sched.log_every == 0 or step == sched.total_steps:
                window.write(step, record["lr"], loop.bad_batches)
            if rank == 0:
                t_heartbeat = _heartbeat(run_dir, step, sched.log_every, t_heartbeat)
            if step % sched.ckpt_every == 0 and step < sched.total_steps:  # the last one is written below
                loop.last_ckpt = ckpts.save(step)
                _track_grid(tracker, parts.ema, cfg, step)
            if on_eval is not None and sched.eval_every and step % sched.eval_every == 0:
                _evaluate(on_eval, parts, step, sched.batch)
            if progress:
                progress({"step": step, "total_steps": sched.total_steps, "kimg": step * sched.batch / 1000,
                          **record})
        # Completed: a last checkpoint, then final.pt and the status that says so.
        loop.last_ckpt = ckpts.save(loop.step)
        ckpts.save_final()
        if rank == 0:
            write_status(run_dir, "completed", step=loop.step, kimg=loop.step * sched.batch / 1000)
            _track_grid(tracker, parts.ema, cfg, loop.step)
    finally:
        _SAVE_NOW = None
        tracker.close()
    return read_status(run_dir)


def _truncate_stats(path: Path, step: int) -> None:
    """Drop stats lines past the checkpoint we resume from: they will be written again."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln)["step"] <= step]
    if len(kept) != len(lines):
        from scm.fileio import atomic_write_bytes

        atomic_write_bytes(path, ("\n".join(kept) + ("\n" if kept else "")).encode())


def _identity(state: dict) -> dict:
    """What a run is: its config hash and what it was built from (sCD: the teacher's final.pt sha256)."""
    return {"config_hash": config_hash(from_dict(state["config"])), "upstream": state.get("upstream") or {}}


def _saved_identity(run_dir: Path) -> tuple[dict | None, str]:
    """(identity, where it was read) of what run_dir holds; (None, '') for a fresh directory.

    config.json + run.json when both are there; otherwise the weights' own record (final.pt or the
    newest valid checkpoint carry config and upstream), so a lost config.json cannot hide a stale run."""
    cfg_path, run_path = run_dir / "config.json", run_dir / "run.json"
    if cfg_path.exists() and run_path.exists():
        upstream = json.loads(run_path.read_text()).get("upstream") or {}
        return _identity({"config": json.loads(cfg_path.read_text()), "upstream": upstream}), str(cfg_path)
    for path in [run_dir / "final.pt", *reversed([p for _, p in list_checkpoints(run_dir)])]:
        try:
            if path.exists():
                return _identity(load_checkpoint(path)), str(path)
        except (CheckpointError, EOFError, RuntimeError, OSError, KeyError):
            continue
    if cfg_path.exists():
        return _identity({"config": json.loads(cfg_path.read_text())}), str(cfg_path)
    return None, ""


def _describe_upstream(upstream: dict) -> str:
    sha = upstream.get("teacher_final_sha256")
    return f"teacher final.pt sha256 {sha[:16]}" if sha else "no recorded teacher"


def run_dir_state(cfg: Config, run_dir: str | Path, upstream: dict) -> tuple[dict, str | None]:
    """(status, mismatch) of run_dir for cfg, read only: mismatch describes another run identity
    (config hash or teacher, see _identity) held there, None when it is this run or a fresh directory.
    'completed' means status.json says so and final.pt exists (prepare_run_dir verifies its checksum)."""
    run_dir = Path(run_dir)
    saved, where = _saved_identity(run_dir)
    now = {"config_hash": config_hash(cfg), "upstream": upstream}
    mismatch = None
    if saved is not None and saved != now:
        if saved["config_hash"] != now["config_hash"]:
            mismatch = f"another config ({where}: hash {saved['config_hash']}, now {now['config_hash']})"
        else:
            mismatch = (f"another teacher ({where}: {_describe_upstream(saved['upstream'])}; now "
                        f"{cfg.run.teacher_run_dir}: {_describe_upstream(upstream)})")
    status = read_status(run_dir)
    if status.get("state") == "completed" and not (run_dir / "final.pt").exists():
        status = {**status, "state": "incomplete"}
    return status, mismatch


def mismatch_error(run_dir: str | Path, mismatch: str) -> ConfigError:
    return ConfigError(f"{run_dir} holds a run of {mismatch}; use a new run directory, or restart it "
                         "(--on-config-change restart)")


def prepare_run_dir(cfg: Config, run_dir: str | Path, on_config_change: str = "error",
                    upstream: dict | None = None) -> dict:
    """Make run_dir ready for cfg (the one place that changes it before training); returns its status
    ('completed' only with a good final.pt).

    A run directory holds one run identity (config hash + upstream, see _identity): it is resumed only
    with the same one. Otherwise 'error' raises, 'restart' clears the stale state (the pipeline's
    choice after a config or teacher change). A corrupt final.pt is removed: training re-creates it.
    Call it holding the run lock (train() does).
    """
    run_dir = Path(run_dir)
    upstream = check_teacher(cfg) if upstream is None else upstream
    status, mismatch = run_dir_state(cfg, run_dir, upstream)
    if mismatch is not None:
        if on_config_change != "restart":
            raise mismatch_error(run_dir, mismatch)
        log.warning("%s holds a run of %s: restarting it from scratch", run_dir, mismatch)
        _clear_run(run_dir)
        status = read_status(run_dir)
    final = run_dir / "final.pt"
    if status.get("state") == "completed" and (why := final_fault(run_dir)) is not None:
        log.error("%s is corrupt (%s): removing it; training resumes from the last checkpoint and "
                  "writes it again", final, why)
        final.unlink()
        status = {**status, "state": "incomplete", "reason": f"corrupt final.pt: {why}"}
    return status


def final_fault(run_dir: str | Path) -> str | None:
    """Why RUN_DIR/final.pt fails its checksum (or cannot be read); None when it is good."""
    try:
        verify_checkpoint(Path(run_dir) / "final.pt")
    except (CheckpointError, OSError) as e:
        return str(e)
    return None


def _clear_run(run_dir: Path) -> None:
    """Remove a stale run's state (checkpoints, stats, status, final weights); keep job logs."""
    import shutil

    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    for name in ("stats.jsonl", "status.json", "final.pt", "config.json", "job.json"):
        (run_dir / name).unlink(missing_ok=True)
