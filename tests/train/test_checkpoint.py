"""Checkpoint directories: atomic appearance, retention, discovery that ignores partial writes."""

import json
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
    assert message.endswith("; move it out of checkpoints/ to go on from the one before"), message
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


def test_a_file_cut_short_or_lost_makes_a_checkpoint_incomplete(tmp_path):
    """meta.json lists every other file with its size: a checkpoint holding a file cut short (a partial
    copy) or missing one it was written with (a lost shard) is not resumed from, and says what it lacks."""
    from seektrain.checkpoint.manager import missing_files

    mgr = CheckpointManager(tmp_path / "checkpoints", keep=3)
    save(mgr, 10)
    newest = save(mgr, 20)
    (newest / "extra.bin").write_bytes(b"not listed: not checked")
    assert missing_files(newest) == [] and mgr.latest() == newest
    size = (newest / "state.pt").stat().st_size
    (newest / "state.pt").write_bytes((newest / "state.pt").read_bytes()[:-1])
    assert missing_files(newest) == [f"all of state.pt ({size - 1:,} of {size:,} bytes)"]
    assert mgr.latest().name == "step_00000010" and mgr.damaged() == [newest]
    lacks = r"step_00000020: not a complete checkpoint: it lacks all of state.pt"
    with pytest.raises(UserError, match=rf"^--resume .*{lacks}"):
        resolve_resume(str(newest), tmp_path)


def test_a_save_killed_between_replacing_renames_leaves_the_old_checkpoint_to_put_back(tmp_path):
    """A save of a step that has a checkpoint (a rollback's) moves the old one aside, renames the new one
    into its place, then deletes the old. Killed between the two renames, neither has the step's name:
    `recover` (which the trainer runs at its start) puts the old one back. Deleting it before the rename,
    as before, lost it, and a rerun started a new run over the run dir."""
    root = tmp_path / "checkpoints"
    mgr = CheckpointManager(root, keep=3)
    save(mgr, 10)
    script = textwrap.dedent(f"""
        import os, signal, torch
        from seektrain.checkpoint import manager
        real, calls = os.replace, []
        def dying_replace(src, dst):
            calls.append(1)
            if len(calls) == 2:  # the new one's rename, after the old one moved aside
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)
        manager.os.replace = dying_replace
        manager.CheckpointManager({str(root)!r}, keep=3).save(10, {{"w": torch.zeros(3)}}, "", {{}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9, proc.stderr
    assert mgr.latest() is None and any(p.name.startswith(".replaced-step_00000010-") for p in root.iterdir())
    assert mgr.recover() == [root / "step_00000010"]
    assert load_checkpoint(mgr.latest())["w"][0] == 10  # the old one, whole
    save(mgr, 20)  # the next save removes the killed one's temporary directory
    assert sorted(os.listdir(root)) == ["step_00000010", "step_00000020"]


def test_a_checkpoint_moved_aside_is_put_back_whatever_pid_its_name_holds(tmp_path):
    """One writer at a time (the trainer holds the run dir's lock), so a checkpoint moved aside without a
    step dir in its place is a killed save's, also where its pid lives again (a restarted container's is
    often the same): put back, never deleted as a leftover. One whose step has a checkpoint is."""
    from seektrain.infer.runs import find_checkpoint

    mgr = CheckpointManager(tmp_path / "run" / "checkpoints", keep=3)
    aside = mgr.root / f".replaced-step_00000010-{os.getpid()}"
    os.replace(save(mgr, 10), aside)
    said = r"\.replaced-step_00000010-\d+ is step_00000010, moved aside by a killed save \(`seektrain train"
    with pytest.raises(UserError, match=f"has no checkpoint under its own name: {said}"):
        find_checkpoint(tmp_path / "run")
    save(mgr, 20)  # a save first puts it back
    assert [p.name for p in mgr.list()] == ["step_00000010", "step_00000020"]
    leftover = mgr.root / ".replaced-step_00000020-1"
    leftover.mkdir()
    save(mgr, 30)
    assert not leftover.exists()


def test_a_meta_json_that_lists_no_files_properly_is_damage_not_a_crash(tmp_path):
    from seektrain.checkpoint.manager import missing_files

    mgr = CheckpointManager(tmp_path / "checkpoints", keep=3)
    path = save(mgr, 10)
    for files in (None, [1, 2], {"state.pt": "big"}):
        (path / "meta.json").write_text(json.dumps({"step": 10, "files": files}))
        assert missing_files(path) == ["a readable meta.json"] and mgr.latest() is None
    size = (path / "state.pt").stat().st_size
    (path / "meta.json").write_text(json.dumps({"step": 10, "files": {"state.pt": size - 1}}))
    assert missing_files(path) == [f"state.pt as written ({size:,} bytes, {size - 1:,} recorded)"]
