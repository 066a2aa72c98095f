import pytest
import torch

from scm.checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)


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
