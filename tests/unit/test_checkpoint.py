import hashlib
import json
import os
import platform
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from scm.checkpoint import (
    MAGIC,
    STALE_AFTER_S,
    CheckpointError,
    RunLock,
    RunLockedError,
    checkpoint_digest,
    checkpoint_path,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_status,
    save_checkpoint,
    verify_checkpoint,
)
from scm.fileio import atomic_write_json


def test_round_trip_and_checksum(tmp_path):
    state = {"w": torch.randn(5, 5), "step": 3}
    path = tmp_path / "c.pt"
    save_checkpoint(path, state)
    back = load_checkpoint(path)
    assert torch.equal(back["w"], state["w"]) and back["step"] == 3
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # flip one byte of the payload
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_named_and_skipped(tmp_path, caplog):
    for step in (10, 20, 30):
        save_checkpoint(checkpoint_path(tmp_path, step), {"step": step})
    newest = checkpoint_path(tmp_path, 30)
    newest.write_bytes(newest.read_bytes()[:100])  # a crash mid-copy
    path, state = latest_valid_checkpoint(tmp_path)
    assert state["step"] == 20 and path == checkpoint_path(tmp_path, 20)
    assert str(newest) in caplog.text and "skipping unusable checkpoint" in caplog.text


def test_keep_last_k(tmp_path):
    for step in range(1, 6):
        save_checkpoint(checkpoint_path(tmp_path, step), {"step": step})
    prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert not list(tmp_path.glob("checkpoints/.*.tmp"))  # no temporary files left behind


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "status.json", {"state": "running"})
        save_checkpoint(checkpoint_path(tmp_path, 1), {"step": 1})
        with open(tmp_path / "plain.txt", "w") as f:  # the reference: what open() creates
            f.write("x")
    finally:
        os.umask(old)
    for path in (tmp_path / "status.json", checkpoint_path(tmp_path, 1), tmp_path / "plain.txt"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_checksum_helpers_agree_with_hashlib(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.arange(10)})
    data = path.read_bytes()
    payload = data[len(MAGIC) + 32:]
    assert checkpoint_digest(path) == hashlib.sha256(payload).hexdigest()
    verify_checkpoint(path)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        verify_checkpoint(path)


HOLDER = """
import sys, time
from scm.checkpoint import RunLock, write_status
lock = RunLock(sys.argv[1])
lock.acquire()
write_status(sys.argv[1], "running", step=3)
print("locked", flush=True)
time.sleep(600)
"""


def _start_holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_run_lock_names_its_holder_and_dies_with_it(tmp_path):
    proc = _start_holder(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=rf"in use by another trainer: pid {proc.pid} on {platform.node()}"):
            RunLock(tmp_path).acquire(wait=False)
        assert read_status(tmp_path)["state"] == "running"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # kill -9: the OS released the lock; the status that still says 'running' is reported dead
    status = read_status(tmp_path)
    assert status["state"] == "dead" and f"pid {proc.pid}" in status["reason"]
    assert read_status(tmp_path, raw=True)["state"] == "running"
    lock = RunLock(tmp_path)
    lock.acquire(wait=False)
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_status_from_another_host_is_dead_when_its_heartbeat_is_stale(tmp_path):
    for age, state in ((60.0, "running"), (STALE_AFTER_S + 60, "dead")):
        atomic_write_json(tmp_path / "status.json", {"state": "running", "pid": 1, "host": "elsewhere",
                                                     "updated": time.time() - age})
        assert read_status(tmp_path)["state"] == state
