"""sCD's teacher is checked before the student's run directory exists: one line naming the teacher and
what is wrong, exit status 2 (missing, unfinished, corrupt header, another network size)."""

import hashlib

import pytest
import yaml

from scm.checkpoint import MAGIC, write_status
from scm.cli import main
from scm.config import resolve_from_dict, to_dict
from scm.fileio import atomic_write_json
from scm.train import check_teacher

STUDENT = {"dataset": "shapes", "size": "tS", "method": "scd", "network": {"model_channels": 8}}


def _fake_teacher(teacher_dir, state="completed", channels=8, header=True):
    """A teacher run as scm.train leaves it: config.json, status.json, final.pt (only its header is read)."""
    teacher_dir.mkdir()
    cfg = resolve_from_dict({"dataset": "shapes", "size": "tS", "method": "teacher",
                             "network": {"model_channels": channels}})
    atomic_write_json(teacher_dir / "config.json", to_dict(cfg))
    write_status(teacher_dir, state, step=8)
    if state == "completed":
        (teacher_dir / "final.pt").write_bytes((MAGIC if header else b"garbage!") + hashlib.sha256(b"w").digest())


def _train(tmp_path, capsys, teacher_dir):
    cfg_file = tmp_path / "scd.yaml"
    cfg_file.write_text(yaml.safe_dump({**STUDENT, "run": {"teacher_run_dir": str(teacher_dir)}}))
    rc = main(["train", "--config", str(cfg_file), "--run-dir", str(tmp_path / "student")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert str(teacher_dir) in err
    assert not (tmp_path / "student").exists()  # nothing left behind
    return err


def test_missing_teacher(tmp_path, capsys):
    err = _train(tmp_path, capsys, tmp_path / "tM")
    assert "teacher" in err and "not found" in err


@pytest.mark.parametrize("state, shown", [("running", "dead"), ("failed", "failed")])
def test_unfinished_teacher(tmp_path, capsys, state, shown):
    _fake_teacher(tmp_path / "tM", state=state)
    err = _train(tmp_path, capsys, tmp_path / "tM")
    # 'running' with nobody holding the teacher's run lock: its trainer is gone
    assert f"is not finished (status.json says '{shown}'" in err and "final.pt missing" in err


def test_teacher_of_another_size(tmp_path, capsys):
    _fake_teacher(tmp_path / "tM", channels=16)
    err = _train(tmp_path, capsys, tmp_path / "tM")
    assert "has network.model_channels 16, the student has network.model_channels 8" in err


def test_teacher_final_without_a_checkpoint_header(tmp_path, capsys):
    _fake_teacher(tmp_path / "tM", header=False)
    err = _train(tmp_path, capsys, tmp_path / "tM")
    assert "final.pt: not an scm checkpoint" in err


def test_teacher_identity_is_the_final_checksum_and_exact_teachers_have_none(tmp_path):
    _fake_teacher(tmp_path / "tM")
    cfg = resolve_from_dict({**STUDENT, "run": {"teacher_run_dir": str(tmp_path / "tM")}})
    assert check_teacher(cfg) == {"teacher_final_sha256": hashlib.sha256(b"w").hexdigest()}
    exact = resolve_from_dict({**STUDENT, "run": {"teacher_run_dir": "exact:gmm"}})
    assert check_teacher(exact) == {}
