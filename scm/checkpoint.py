"""Checkpoints and run-directory state: atomic writes, checksums, keep-last-K, status files.

A checkpoint file is MAGIC + sha256(payload) + payload, where payload is a torch.save of the state.
Writes go to a temporary file in the same folder, are fsynced, then renamed: a crash leaves either
the old file or the new one, never half of one. A truncated or corrupt file fails its checksum and
is skipped with a warning naming it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MAGIC = b"SCMCKPT1"
_NAME = re.compile(r"^checkpoint-(\d{9})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (truncated, corrupt, wrong format)."""


# ----------------------------------------------------------------------------
# Atomic file writes.


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


# ----------------------------------------------------------------------------
# Checkpoint files.


def save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    atomic_write_bytes(path, MAGIC + hashlib.sha256(payload).digest() + payload)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    data = Path(path).read_bytes()
    if len(data) < len(MAGIC) + 32 or not data.startswith(MAGIC):
        raise CheckpointError(f"{path}: not an scm checkpoint (or truncated before its header)")
    digest, payload = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupt)")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"checkpoint-{step:09d}.pt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_valid_checkpoint(run_dir: Path, map_location="cpu") -> tuple[Path, dict] | None:
    """The newest checkpoint that loads and passes its checksum; corrupt ones are named and skipped."""
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, map_location)
        except (CheckpointError, EOFError, RuntimeError, OSError) as e:
            log.warning("skipping unusable checkpoint %s: %s", path, e)
    return None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the last `keep` checkpoints."""
    for _, path in list_checkpoints(run_dir)[:-keep]:
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------
# status.json: running / completed / failed / diverged, with the reason.


def write_status(run_dir: Path, state: str, **fields) -> None:
    atomic_write_json(Path(run_dir) / "status.json", {"state": state, "updated": time.time(), **fields})


def read_status(run_dir: Path) -> dict:
    path = Path(run_dir) / "status.json"
    if not path.exists():
        return {"state": "missing"}
    return json.loads(path.read_text())
