"""Checkpoint directories: atomic appearance, retention, discovery that ignores partial writes."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from seektrain.checkpoint.manager import CheckpointManager, load_checkpoint, resolve_resume
from seektrain.errors import UserError


def save(mgr, step):
    return mgr.save(step, {"w": torch.full((3,), float(step))}, "[train]\n", {"tokens": step * 10})


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign object"])
def test_a_damaged_state_file_is_one_line_without_torchs_advice(tmp_path, damage):
    """torch's error for a file that does not unpickle spans lines and advises weights_only=False, which
    is no remedy for a damaged file (and unsafe for a foreign one). A truncated file, the companion case,
    was one line already."""
    path = save(CheckpointManager(tmp_path / "checkpoints", keep=1), 1)
    state = path / "state.pt"
    if damage == "foreign object":  # well-formed, but holding a class weights_only does not load
        torch.save({"w": UserError("x")}, state)
    else:
        state.write_bytes(b"garbage\n" if damage == "garbage" else state.read_bytes()[:100])
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert message.startswith(f"cannot read checkpoint {path}: ") and "\n" not in message, message
    assert "weights_only" not in message
    if damage == "foreign object":  # torch's reason is kept: it names what the file holds
        assert "Unsupported global: GLOBAL seektrain.errors.UserError" in message, message


def test_save_load_retention(tmp_path):
    mgr = CheckpointManager(tmp_path / "checkpoints", keep=2)
    for step in (10, 20, 30):
        save(mgr, step)
    assert [p.name for p in mgr.list()] == ["step_00000020", "step_00000030"]
    assert load_checkpoint(mgr.latest())["w"][0] == 30
    assert resolve_resume("auto", tmp_path) == mgr.latest()
    assert resolve_resume(str(mgr.list()[0]), tmp_path) == mgr.list()[0]
    assert resolve_resume("never", tmp_path) is None
    assert sorted(os.listdir(mgr.root)) == ["step_00000020", "step_00000030"]  # no temp leftovers
    save(mgr, 30)  # re-saving a step replaces it
    assert [p.name for p in mgr.list()] == ["step_00000020", "step_00000030"]


def test_partial_checkpoints_are_never_picked(tmp_path):
    mgr = CheckpointManager(tmp_path / "checkpoints", keep=3)
    save(mgr, 10)
    # a save killed mid-write leaves a hidden temp dir; a copied-in dir without all files is incomplete
    (mgr.root / ".tmp-step_00000020-123").mkdir()
    (mgr.root / ".tmp-step_00000020-123" / "state.pt").write_bytes(b"trunc")
    (mgr.root / "step_00000030").mkdir()
    (mgr.root / "step_00000030" / "state.pt").write_bytes(b"trunc")
    assert mgr.latest().name == "step_00000010"
    save(mgr, 40)
    assert not (mgr.root / ".tmp-step_00000020-123").exists()


def test_kill_during_write_leaves_previous_checkpoint(tmp_path):
    """A process killed (SIGKILL) while torch.save writes never produces a final-named directory."""
    root = tmp_path / "checkpoints"
    mgr = CheckpointManager(root, keep=3)
    save(mgr, 10)
    script = textwrap.dedent(f"""
        import os, signal, torch
        from seektrain.checkpoint import manager
        real = manager._write
        def dying_write(path, write):
            real(path, write)
            os.kill(os.getpid(), signal.SIGKILL)  # die right after the first file of the checkpoint
        manager._write = dying_write
        manager.CheckpointManager({str(root)!r}, keep=3).save(20, {{"w": torch.zeros(3)}}, "", {{}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert any(p.name.startswith(".tmp-step_00000020") for p in root.iterdir())
    assert mgr.latest().name == "step_00000010"
    assert resolve_resume("auto", tmp_path).name == "step_00000010"


def test_resume_path_errors(tmp_path):
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "missing"), tmp_path)
