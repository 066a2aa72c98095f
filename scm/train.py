"""One training loop for the TrigFlow teacher, sCT and sCD (method.md; EDM2's habits).

Progress is counted in images (kimg). The run directory holds everything:

    config.json      the resolved config            run.json     hash, git commit, versions, host, job ids
    status.json      running/completed/failed/diverged, with the reason
    stats.jsonl      one line per log interval      checkpoints/ the last K checkpoints
    final.pt         EMA and raw weights + config, written once the run completed

Resume = call train() again with the same run directory: it loads the newest valid checkpoint
(model, EMA, optimizer, grad scaler, RNG states, data position) and continues bit-exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import resource
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from scm import config as C
from scm.checkpoint import (
    atomic_write_json,
    checkpoint_path,
    latest_valid_checkpoint,
    prune_checkpoints,
    read_status,
    save_checkpoint,
    write_status,
)
from scm.data import InfiniteLoader, build_dataset
from scm.ema import EMA
from scm.losses import build_loss
from scm.networks import build_network

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


def write_run_json(run_dir: Path, cfg: C.Config) -> None:
    """run.json: resolved config and hash, code version, environment; keeps job ids from earlier writes."""
    path = run_dir / "run.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    job_ids = old.get("slurm_job_ids", [])
    jid = os.environ.get("SLURM_JOB_ID")
    if jid and jid not in job_ids:
        job_ids.append(jid)
    atomic_write_json(path, {"config": C.to_dict(cfg), "config_hash": C.config_hash(cfg), "git": _git_info(),
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
    from scm.checkpoint import load_checkpoint

    state = load_checkpoint(final, map_location=device)
    cfg = C.from_dict(state["config"])
    net = build_network(cfg.network, cfg.data, cfg.sigma_d)
    net.load_state_dict(state[which])
    return net.to(device).eval(), cfg


# ----------------------------------------------------------------------------
# Learning rate: EDM2's inverse square-root decay with a linear ramp-up.


def learning_rate(cfg: C.OptimConfig, step: int, cur_nimg: int) -> float:
    lr = cfg.lr
    if cfg.lr_ref_iters > 0:
        lr /= math.sqrt(max(step / cfg.lr_ref_iters, 1.0))
    if cfg.lr_rampup_kimg > 0:
        lr *= min(cur_nimg / (cfg.lr_rampup_kimg * 1000), 1.0)
    return lr


def _optimizer(cfg: C.OptimConfig, params):
    kind = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[cfg.name]
    return kind(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def _device(cfg: C.RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise C.ConfigError("run.device: 'cuda' requested but no CUDA device is available")
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


# ----------------------------------------------------------------------------
# The loop.


def train(cfg: C.Config, run_dir: str | Path, progress: Callable[[dict], None] | None = None,
          stop_after_steps: int | None = None, on_config_change: str = "error",
          on_eval: Callable[[int, float, torch.nn.Module], None] | None = None) -> dict:
    """Train cfg.run.method in run_dir until cfg.run.total_kimg; resumable; returns the final status.

    progress(info) is called after every step with {step, total_steps, kimg, loss, ...} (the CLI draws
    the bar). stop_after_steps ends the call early (tests, preemption drills) without completing.
    on_config_change: 'error' (default) or 'restart' when run_dir holds a run of another config.
    on_eval(step, kimg, ema_model) is called every run.eval_kimg (sweeps report intermediate FIDs);
    it may raise StopTraining to end the run early (status 'stopped').
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    done = prepare_run_dir(cfg, run_dir, on_config_change)
    if done.get("state") == "completed":  # idempotent: a completed run is not trained again
        return done
    rank, world = _dist()
    log.info("training %s %s in %s (rank %d, world size %d)", cfg.run.method, cfg.run.size, run_dir, rank, world)
    device = _device(cfg.run)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if cfg.run.precision == "fp16" and device.type != "cuda":
        raise C.ConfigError("run.precision: fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
    if rank == 0:
        atomic_write_json(run_dir / "config.json", C.to_dict(cfg))
        write_run_json(run_dir, cfg)
        write_status(run_dir, "running", step=None)

    # Networks: sCD starts from the teacher's EMA weights and distills from that EMA copy (method.md §5).
    torch.manual_seed(cfg.run.seed)
    net = build_network(cfg.network, cfg.data, cfg.sigma_d).to(device)
    teacher = None
    if cfg.run.method == "scd":
        if not cfg.run.teacher_run_dir:
            raise C.ConfigError("run.teacher_run_dir: sCD needs the run directory of a finished teacher")
        teacher, _ = load_final(Path(cfg.run.teacher_run_dir), "ema", device)
        teacher.requires_grad_(False)
        missing, unexpected = net.load_state_dict(teacher.state_dict(), strict=False)
        if unexpected:
            raise C.ConfigError(f"run.teacher_run_dir: teacher weights do not fit the student: {unexpected[:5]}")
        if missing:
            log.info("student parameters not in the teacher (kept at init): %s", missing)
    ema = EMA(net, cfg.ema)
    opt = _optimizer(cfg.optim, net.parameters())
    use_scaler = cfg.run.precision == "fp16"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.run.precision)
    ddp_net = net
    if world > 1:
        ddp_net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=not cfg.loss.adaptive_weighting)
    loss_fn = build_loss(cfg.run.method, cfg.loss, cfg.sigma_d, teacher)

    dataset = build_dataset(cfg.data, cfg.sigma_d)
    loader = InfiniteLoader(dataset, cfg.run.batch_size, seed=cfg.run.seed, rank=rank, world_size=world,
                            xflip=cfg.data.xflip)
    batch = cfg.run.batch_size
    total_steps = max(1, math.ceil(cfg.run.total_kimg * 1000 / batch))
    ckpt_every = max(1, round(cfg.run.checkpoint_kimg * 1000 / batch)) if cfg.run.checkpoint_kimg else total_steps
    log_every = max(1, round(cfg.run.log_kimg * 1000 / batch))
    eval_every = max(1, round(cfg.run.eval_kimg * 1000 / batch)) if cfg.run.eval_kimg > 0 else 0

    # Resume from the newest valid checkpoint.
    step, bad_batches, last_ckpt = 0, 0, None
    found = latest_valid_checkpoint(run_dir, map_location=device)
    if found:
        last_ckpt, state = found
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        loader.load_state_dict(state["loader"])
        step, bad_batches = state["step"], state["bad_batches"]
        _set_rng_state(state["rng"], device)
        log.info("resumed from %s at step %d (%.1f kimg)", last_ckpt, step, step * batch / 1000)
        _truncate_stats(run_dir / "stats.jsonl", step)
    else:
        torch.manual_seed(cfg.run.seed + 1 + rank)

    def save(at_step: int, loader_state=None, rng=None) -> Path:
        path = checkpoint_path(run_dir, at_step)
        if rank == 0:
            save_checkpoint(path, {"net": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                                   "scaler": scaler.state_dict(), "loader": loader_state or loader.state_dict(),
                                   "rng": rng or _rng_state(device), "step": at_step, "bad_batches": bad_batches,
                                   "config": C.to_dict(cfg)})
            prune_checkpoints(run_dir, cfg.run.keep_checkpoints)
        return path

    # Preemption: a step is 'compute' until the optimizer touches the weights, then 'commit'. During
    # compute the weights are still those of `step`, so saving them with the data position and RNG
    # taken at the step's start is exact; during the short commit phase we keep the last checkpoint.
    phase = {"name": "idle", "loader": None, "rng": None}

    def save_now() -> Path | None:
        if phase["name"] == "commit":
            log.warning("preempted while updating weights: resuming from %s", last_ckpt)
            return None
        if phase["name"] == "compute":
            path = save(step, phase["loader"], phase["rng"])
        else:
            path = save(step)
        log.info("preemption checkpoint %s at step %d", path, step)
        return path

    global _SAVE_NOW
    _SAVE_NOW = save_now

    net.train()
    window, t_window, steps_this_call = [], time.perf_counter(), 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        while step < total_steps:
            if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                return read_status(run_dir)
            # One optimization step.
            phase.update(name="compute", loader=loader.state_dict(), rng=_rng_state(device))
            x0, labels = next(loader)
            x0 = x0.to(device)
            labels = labels.to(device) if cfg.data.label_dim else None
            cur_nimg = (step + 1) * batch
            lr = learning_rate(cfg.optim, step, cur_nimg)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, diag = loss_fn(ddp_net, x0, labels, step=step)
            scaler.scale(loss.float().mean()).backward()
            scaler.unscale_(opt)
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm).item()
            # NaN/Inf: skip up to max_bad_batches, then stop naming the step and the last good checkpoint.
            # (With fp16's grad scaler, inf gradients alone are routine: the scaler skips and rescales.)
            phase["name"] = "commit"
            if not math.isfinite(diag["loss"]) or (not math.isfinite(grad_norm) and not use_scaler):
                bad_batches += 1
                if bad_batches > cfg.run.max_bad_batches:
                    raise DivergedError(f"non-finite loss or gradient at step {step} (kimg {step * batch / 1000:.1f});"
                                        f" last good checkpoint: {last_ckpt or 'none'}")
                log.warning("skipping non-finite batch at step %d (%d/%d)", step, bad_batches,
                            cfg.run.max_bad_batches)
                opt.zero_grad(set_to_none=True)
                if use_scaler:
                    scaler.update()
            else:
                scaler.step(opt)
                scaler.update()
                ema.update(net, cur_nimg, batch)
            step += 1
            steps_this_call += 1
            phase["name"] = "idle"
            window.append({**diag, "grad_norm": grad_norm})
            info = {"step": step, "total_steps": total_steps, "kimg": step * batch / 1000, "lr": lr, **diag,
                    "grad_norm": grad_norm}
            if step % log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - t_window
                row = {"step": step, "kimg": step * batch / 1000, "lr": lr,
                       "sec_per_kimg": elapsed / (len(window) * batch / 1000),
                       "peak_mem_mb": _peak_memory_mb(device), "bad_batches": bad_batches, "time": time.time()}
                for key in window[0]:
                    vals = [w[key] for w in window]
                    row[key] = float(np.mean(vals))
                row["grad_norm_max"] = float(np.max([w["grad_norm"] for w in window]))
                if rank == 0:
                    with open(run_dir / "stats.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                window, t_window = [], time.perf_counter()
            if step % ckpt_every == 0 and step < total_steps:
                last_ckpt = save(step)
            if on_eval is not None and eval_every and step % eval_every == 0:
                on_eval(step, step * batch / 1000, ema.model)
                net.train()
            if progress:
                progress(info)
    except DivergedError as e:
        if rank == 0:
            write_status(run_dir, "diverged", step=step, reason=str(e), last_checkpoint=str(last_ckpt))
        raise
    except StopTraining as e:
        if rank == 0:
            write_status(run_dir, "stopped", step=step, reason=str(e))
        raise
    except SystemExit:  # submitit requeues a preempted/timed-out job by exiting: the run goes on later
        if rank == 0:
            write_status(run_dir, "running", step=step, reason="interrupted: requeued by the launcher")
        raise
    except KeyboardInterrupt:
        if rank == 0:
            write_status(run_dir, "failed", step=step, reason="interrupted by the user (run again to resume)")
        raise
    except BaseException as e:
        if rank == 0:
            write_status(run_dir, "failed", step=step, reason=f"{type(e).__name__}: {e}")
        raise
    finally:
        _SAVE_NOW = None

    # Completed: a last checkpoint, then final.pt (what sCD, sampling and evaluation load).
    last_ckpt = save(step)
    if rank == 0:
        save_checkpoint(run_dir / "final.pt", {"ema": ema.state_dict(), "net": net.state_dict(),
                                               "config": C.to_dict(cfg), "step": step})
        write_status(run_dir, "completed", step=step, kimg=step * batch / 1000)
    return read_status(run_dir)


def _truncate_stats(path: Path, step: int) -> None:
    """Drop stats lines past the checkpoint we resume from: they will be written again."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln)["step"] <= step]
    if len(kept) != len(lines):
        from scm.checkpoint import atomic_write_bytes

        atomic_write_bytes(path, ("\n".join(kept) + ("\n" if kept else "")).encode())


def prepare_run_dir(cfg: C.Config, run_dir: str | Path, on_config_change: str = "error") -> dict:
    """Check run_dir against cfg; returns its status ('completed' only with final.pt present).

    A run directory holds one config: a run is resumed only with the same config. Otherwise 'error'
    raises, 'restart' clears the stale state (the pipeline's choice after a config change).
    """
    run_dir = Path(run_dir)
    saved_path = run_dir / "config.json"
    if saved_path.exists() and C.config_hash(C.from_dict(json.loads(saved_path.read_text()))) != C.config_hash(cfg):
        if on_config_change != "restart":
            raise C.ConfigError(f"{run_dir} holds a run with another config (config.json); use a new run "
                                "directory, or restart it (--on-config-change restart)")
        log.warning("config changed: restarting %s from scratch", run_dir)
        _clear_run(run_dir)
    status = read_status(run_dir)
    if status.get("state") == "completed" and not (run_dir / "final.pt").exists():
        status = {**status, "state": "incomplete"}
    return status


def _clear_run(run_dir: Path) -> None:
    """Remove a stale run's state (checkpoints, stats, status, final weights); keep job logs."""
    import shutil

    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    for name in ("stats.jsonl", "status.json", "final.pt", "config.json", "job.json"):
        (run_dir / name).unlink(missing_ok=True)
