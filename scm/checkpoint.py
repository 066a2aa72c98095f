"""Checkpoints and run-directory state: checksums, keep-last-K, status files, the run lock.

A checkpoint file is MAGIC + sha256(payload) + payload, where payload is a torch.save of the state,
written atomically (scm.fileio): a crash leaves either the old file or the new one, never half of one.
A truncated or corrupt file fails its checksum and is skipped with a warning naming it.

One trainer per run directory: RunLock holds an exclusive flock on RUN_DIR/lock (the OS releases it
when the holder dies, even by kill -9); the file says who holds it. status.json records the writer's
pid, host and SLURM job id and a heartbeat, so read_status reports a run whose trainer died as 'dead'.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import platform
import re
import time
from pathlib import Path

import torch

from scm.fileio import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

MAGIC = b"SCMCKPT1"
_NAME = re.compile(r"^checkpoint-(\d{9})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (truncated, corrupt, wrong format)."""


# ----------------------------------------------------------------------------
# Checkpoint files.


def save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    atomic_write_bytes(path, MAGIC + hashlib.sha256(payload).digest() + payload)


def checkpoint_digest(path: Path) -> str:
    """The sha256 (hex) a checkpoint file's header records for its payload: its identity, read cheaply.
    load_checkpoint verifies it against the payload."""
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 32)
    if len(head) < len(MAGIC) + 32 or not head.startswith(MAGIC):
        raise CheckpointError(f"{path}: not an scm checkpoint (or truncated before its header)")
    return head[len(MAGIC):].hex()


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    data = Path(path).read_bytes()
    if len(data) < len(MAGIC) + 32 or not data.startswith(MAGIC):
        raise CheckpointError(f"{path}: not an scm checkpoint (or truncated before its header)")
    digest, payload = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupt)")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless the file's payload matches its checksum (read in chunks, not unpickled)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 32)
        if len(head) < len(MAGIC) + 32 or not head.startswith(MAGIC):
            raise CheckpointError(f"{path}: not an scm checkpoint (or truncated before its header)")
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    if digest.digest() != head[len(MAGIC):]:
        raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupt)")


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
# Who is running: pid, host, SLURM job id; liveness.

HEARTBEAT_S = 60.0        # a running trainer rewrites status.json at least this often (and every log interval)
STALE_AFTER_S = 15 * 60   # a status from another host with no heartbeat for this long is a dead run


def holder_info() -> dict:
    """This process as a run's holder: pid, host, SLURM job id (if any), start time."""
    info = {"pid": os.getpid(), "host": platform.node(), "started": time.time()}
    if os.environ.get("SLURM_JOB_ID"):
        info["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return info


def describe_holder(info: dict) -> str:
    text = f"pid {info.get('pid')} on {info.get('host')}"
    if info.get("slurm_job_id"):
        text += f" (SLURM job {info['slurm_job_id']})"
    if info.get("started"):
        text += f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['started']))}"
    return text


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: state letter after the command name in parentheses
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] not in "ZX"
    except (OSError, ValueError, IndexError):
        return True


# ----------------------------------------------------------------------------
# The run lock: one trainer per run directory.


class RunLockedError(RuntimeError):
    """The run directory is locked by another live trainer (and we were told not to wait)."""


class RunLock:
    """An exclusive flock on RUN_DIR/lock; the file names the holder (holder_info)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "lock"
        self.fd: int | None = None

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self, wait: bool = True, poll_s: float = 1.0) -> None:
        """Take the lock; if another process holds it, say who and wait for it (or raise RunLockedError)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        told = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                holder = describe_holder(self.holder())
                if not wait:
                    raise RunLockedError(f"{self.path.parent} is in use by another trainer: {holder}")
                if not told:
                    log.warning("%s is in use by another trainer (%s): waiting for it to finish",
                                self.path.parent, holder)
                    told = True
                time.sleep(poll_s)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_is_held(run_dir: Path) -> bool:
    """Whether some process holds RUN_DIR/lock (probed with a shared lock, released at once)."""
    path = Path(run_dir) / "lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------
# status.json: running / completed / failed / diverged, with the reason.


def write_status(run_dir: Path, state: str, **fields) -> None:
    """status.json with the writer (pid, host, SLURM job id); 'updated' is the heartbeat."""
    me = holder_info()
    me.pop("started")
    atomic_write_json(Path(run_dir) / "status.json", {"state": state, "updated": time.time(), **me, **fields})


def read_status(run_dir: Path, raw: bool = False) -> dict:
    """status.json; a 'running' run whose trainer is gone is reported as state 'dead' (unless raw)."""
    path = Path(run_dir) / "status.json"
    if not path.exists():
        return {"state": "missing"}
    status = json.loads(path.read_text())
    if raw or status.get("state") != "running":
        return status
    why = _why_dead(Path(run_dir), status)
    return {**status, "state": "dead", "reason": why} if why else status


def _why_dead(run_dir: Path, status: dict) -> str | None:
    """Why a 'running' status is stale, or None while its trainer lives."""
    pid, host = status.get("pid"), status.get("host")
    if pid is None:  # written by an older version: no way to tell, trust the lock
        return None if lock_is_held(run_dir) else "no trainer holds the run lock"
    if host == platform.node():
        if not pid_alive(int(pid)):
            return f"its trainer (pid {pid} on {host}) is gone"
        if not lock_is_held(run_dir):
            return f"pid {pid} on {host} no longer holds the run lock"
        return None
    age = time.time() - float(status.get("updated", 0))
    if age > STALE_AFTER_S:
        return f"no heartbeat from pid {pid} on {host} for {age / 60:.0f} min"
    return None
