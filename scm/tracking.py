"""Optional experiment tracking: TensorBoard or Weights & Biases, fed from the records of stats.jsonl.

stats.jsonl stays the source of truth (the report reads it); a tracker mirrors each of its rows as
scalars, and a small grid of EMA samples at each checkpoint and at the end of training, so a run can be
watched where researchers look. Off by default (`run.tracker: none`); the tracker is not part of a run's
identity (scm.config.IDENTITY_NEUTRAL), so switching it on never retrains anything.

- tensorboard: event files in RUN_DIR/tensorboard (`tensorboard --logdir results/runs`). A resumed run
  purges the events past its checkpoint, as stats.jsonl is truncated there.
- wandb: project `run.tracker_project`, run name and id = the run directory's name (a resumed run
  continues the same W&B run), files in RUN_DIR/wandb. Offline mode when W&B's server cannot be
  reached (compute nodes often have no network; `wandb sync RUN_DIR/wandb/offline-run-*` later), or
  whatever WANDB_MODE says when it is set.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

WANDB_HOST = ("api.wandb.ai", 443)


class Tracker:
    """No tracking: every call is a no-op (run.tracker: none)."""

    wants_images = False

    def log(self, row: dict[str, Any], step: int) -> None:
        pass

    def image(self, name: str, grid: torch.Tensor, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a stats row (step itself is the x axis, time is wall clock)."""
    return {k: float(v) for k, v in row.items()
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker(Tracker):
    wants_images = True

    def __init__(self, run_dir: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events at or past the resumed step: they will be logged again
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step or None)

    def log(self, row, step):
        for key, value in _scalars(row).items():
            self.writer.add_scalar(f"train/{key}", value, step)
        self.writer.flush()

    def image(self, name, grid, step):
        self.writer.add_image(name, grid, step)  # (3, H, W) uint8
        self.writer.flush()

    def close(self):
        self.writer.close()


def _reachable(host: tuple[str, int], timeout_s: float = 3.0) -> bool:
    try:
        with socket.create_connection(host, timeout=timeout_s):
            return True
    except OSError:
        return False


class WandbTracker(Tracker):
    wants_images = True

    def __init__(self, run_dir: Path, project: str, config: dict[str, Any]):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if _reachable(WANDB_HOST) else "offline")
        if mode == "offline":
            log.info("W&B offline (no connection to %s): sync later with `wandb sync %s/wandb/offline-run-*`",
                     WANDB_HOST[0], run_dir)
        self.wandb = wandb
        self.run = wandb.init(project=project, name=run_dir.name, id=run_dir.name, resume="allow", mode=mode,
                              dir=str(run_dir), config=config)

    def log(self, row, step):
        self.run.log({f"train/{k}": v for k, v in _scalars(row).items()}, step=step)

    def image(self, name, grid, step):
        self.run.log({name: self.wandb.Image(grid.permute(1, 2, 0).numpy())}, step=step)

    def close(self):
        self.run.finish()


def make_tracker(kind: str, run_dir: str | Path, project: str = "scm-bench", config: dict | None = None,
                 resume_step: int = 0) -> Tracker:
    """The tracker of `run.tracker`; a missing package is one error naming the key and the install."""
    run_dir = Path(run_dir)
    if kind == "none":
        return Tracker()
    if kind == "tensorboard":
        try:
            return TensorBoardTracker(run_dir, resume_step)
        except ImportError:
            raise ImportError("run.tracker=tensorboard needs the tensorboard package: "
                              "pip install -e '.[tracking]'") from None
    if kind == "wandb":
        try:
            return WandbTracker(run_dir, project, config or {})
        except ImportError:
            raise ImportError("run.tracker=wandb needs the wandb package: pip install -e '.[tracking]'") from None
    raise ValueError(f"run.tracker: unknown tracker {kind!r}; choose none, tensorboard or wandb")


def sample_grid(net: torch.nn.Module, cfg, num: int = 16) -> torch.Tensor | None:
    """(3, H, W) uint8 grid of `num` EMA samples (seeds 0..num-1: the same noise at every checkpoint), the
    way the run is meant to be sampled (CM: 2 steps; teacher: its solver); None for latents (no decoder)."""
    from torchvision.utils import make_grid

    from scm.evaluate import generate

    if cfg.data.channels not in (1, 3):
        return None
    steps = cfg.sampler.teacher_steps if cfg.run.method == "teacher" else 2
    was_training = net.training
    with torch.no_grad():
        images, _ = generate(net, cfg, list(range(num)), steps, batch=num,
                             device=next(net.parameters()).device)
    net.train(was_training)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return make_grid(images, nrow=int(num ** 0.5), padding=1)
