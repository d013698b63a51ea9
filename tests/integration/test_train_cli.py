"""`seektrain train` end to end in real subprocesses: kill -9 and signals, then `--resume auto`,
must reproduce the uninterrupted run bit for bit (fp32, CPU); bad input fails with one line, exit 2,
and leaves the run directory untouched."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from file_limits import file_size_limit
from seektrain.cli import main
from seektrain.train.metrics import read_metrics

STEPS = 24
RUN = [
    f"train.steps={STEPS}",
    "train.log_every=1",
    "train.eval_every=10",
    "train.eval_batches=2",
    "checkpoint.every=5",
    "checkpoint.keep=2",
    "train.device=cpu",
]
COMPARED = (
    "step",
    "tokens",
    "loss",
    "lr",
    "grad_norm",
    "mtp_loss",
    "expert_max_violation",
    "val_loss",
    "event",
)


def cli(run_dir, overrides, resume="auto"):
    args = [sys.executable, "-m", "seektrain", "train", "--run-dir", str(run_dir), "--resume", resume]
    for o in overrides:
        args += ["--set", o]
    return args


def comparable(run_dir):
    return [
        {k: r[k] for k in COMPARED if k in r}
        for r in read_metrics(Path(run_dir) / "metrics.jsonl")
        if r.get("event") != "stopped"
    ]


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = subprocess.run(cli(run, [*toy, *RUN]), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return comparable(run)


def logged_past(run, step):
    try:
        return any(r["step"] > step for r in read_metrics(run / "metrics.jsonl")[-3:])
    except (FileNotFoundError, ValueError):  # not there yet, or a line half written
        return False


def start_and_interrupt(run, overrides, signum):
    """Start a run, send `signum` once its first checkpoint (step 5) is complete and a later step has
    been logged (so the resume must cut metrics.jsonl back); return the process."""
    proc = subprocess.Popen(cli(run, overrides), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "checkpoints" / "step_00000005").exists() and logged_past(run, 6):
            break
        time.sleep(0.002)
    proc.send_signal(signum)
    proc.wait(timeout=120)
    return proc


def check_no_step_twice(records):
    for kind in ("loss", "val_loss"):
        steps = [r["step"] for r in records if kind in r]
        assert steps == sorted(set(steps)), f"{kind} logged twice or out of order: {steps}"


@pytest.mark.parametrize("signum, code", [(signal.SIGKILL, -9), (signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupt_then_resume_is_bitwise_identical(toy, tmp_path, reference, signum, code):
    run = tmp_path / "run"
    proc = start_and_interrupt(run, [*toy, *RUN], signum)
    out, err = proc.communicate()
    assert proc.returncode == code, err
    stopped_at = max(int(p.name[5:]) for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert 5 <= stopped_at < STEPS, "interrupted too late to test a resume"
    if signum != signal.SIGKILL:  # a checkpoint was written at the step where the signal arrived
        assert "checkpoint written" in out
        assert read_metrics(run / "metrics.jsonl")[-1]["event"] == "stopped"
    resumed = subprocess.run(cli(run, [*toy, *RUN]), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run / 'checkpoints'}" in resumed.stdout
    got = comparable(run)
    check_no_step_twice(got)
    assert got == reference  # every loss, norm, lr and val_loss equal as floats: bitwise


def test_sigterm_again_while_stopping_still_checkpoints(toy, tmp_path):
    """A second SIGTERM (a scheduler's repeat, a wrapper forwarding one) while the first's checkpoint was
    under way ended the run at once: exit 130, no checkpoint. A repeat now changes nothing; the first says
    what it does (and that Ctrl-C again stops without a checkpoint)."""
    run, err_file = tmp_path / "run", tmp_path / "stderr.txt"
    with err_file.open("w") as err:
        proc = subprocess.Popen(cli(run, [*toy, *RUN]), stdout=subprocess.PIPE, stderr=err, text=True)
    announced = "SIGTERM: stopping after this step, with a checkpoint (Ctrl-C again: at once, without one)"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not logged_past(run, 2):
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    while time.time() < deadline and proc.poll() is None and announced not in err_file.read_text():
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)  # while it stops: ~0.6 s more of the step and its checkpoint
    out, _ = proc.communicate(timeout=120)
    err = err_file.read_text()
    assert proc.returncode == 143 and err.count(announced) == 1 and "Traceback" not in err, err
    assert "checkpoint written" in out and read_metrics(run / "metrics.jsonl")[-1]["event"] == "stopped"


def test_a_closed_stdout_checkpoints_and_stops_like_sigterm(toy, tmp_path, reference):
    """`seektrain train | head`: when stdout's reader goes away, the run checkpoints at the end of that
    step and exits 141 (128 + SIGPIPE) without a traceback, instead of dying without a checkpoint; it
    then resumes bit for bit."""
    run = tmp_path / "run"
    proc = subprocess.Popen(cli(run, [*toy, *RUN]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step      6 "):
            break
    proc.stdout.close()  # the reader is gone, as when `head` exits
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    last = read_metrics(run / "metrics.jsonl")[-1]
    assert last["event"] == "stopped" and last["signal"] == "SIGPIPE"
    assert (run / "checkpoints" / f"step_{last['step']:08d}").is_dir() and 6 <= last["step"] < STEPS
    resumed = subprocess.run(cli(run, [*toy, *RUN]), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    got = comparable(run)
    check_no_step_twice(got)
    assert got == reference


def snapshot(path):
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(path).rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(toy, tmp_path_factory):
    run = tmp_path_factory.mktemp("small") / "run"
    assert (
        main(["train", "--run-dir", str(run), *sum((["--set", o] for o in [*toy, "train.steps=3"]), [])]) == 0
    )
    return run


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--set", "train.stpes=5"], ["unknown config key", "train.steps"]),
        (["--set", "data.path=/nonexistent/data"], ["/nonexistent/data", "seektrain prepare"]),
        (["--set", "train.micro_batch_size=3"], ["micro_batch_size=3", "global_batch_size=8"]),
        (["--set", "model.hidden_size=32"], ["cannot resume", "hidden_size"]),
        (["--resume", "never"], ["already holds a run (checkpoints up to step_00000003)", "--resume auto"]),
        (["--resume", "/nonexistent/ckpt"], ["not a complete checkpoint"]),
        (["--set", "model.max_position_embeddings=16"], ["data.seq_len=32", "max_position_embeddings=16"]),
    ],
)
def test_bad_input_one_error_line_nothing_harmed(toy, finished_run, capsys, extra, words):
    before = snapshot(finished_run)
    args = [
        "train",
        "--run-dir",
        str(finished_run),
        *sum((["--set", o] for o in [*toy, "train.steps=6"]), []),
    ]
    capsys.readouterr()
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for word in words:
        assert word in err[0]
    assert snapshot(finished_run) == before


def test_a_run_dir_under_a_file_is_one_error_line(toy, tmp_path, capsys):
    """A --run-dir that is a file, or lies under one, is refused before any work (it used to end in an
    OSError traceback when the run directory was created)."""
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for run_dir, words in ((afile, "exists and is not a directory"), (afile / "sub", "is not a directory")):
        capsys.readouterr()
        assert main(train_args(run_dir, [*toy, "train.steps=1"])) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --run-dir") and words in err[0], err
    assert afile.read_text() == "keep me"


def copy_of(run, where):
    shutil.copytree(run, where)
    return where


def train_args(run_dir, overrides, *extra):
    return ["train", "--run-dir", str(run_dir), *sum((["--set", o] for o in overrides), []), *extra]


def test_resume_never_keeps_a_run_that_has_no_checkpoint_yet(toy, finished_run, tmp_path, capsys):
    """A run stopped before its first checkpoint still has config.toml and metrics.jsonl: --resume never
    must not start over them (it used to cut metrics.jsonl to nothing)."""
    run = copy_of(finished_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints")
    before = snapshot(run)
    capsys.readouterr()
    assert main(train_args(run, [*toy, "train.steps=6"], "--resume", "never")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {run} already holds a run (config.toml, metrics.jsonl; no checkpoint yet) and --resume "
        "never would start a new one over it: choose another --run-dir, or start it over with --resume auto"
    ]
    assert snapshot(run) == before


def test_another_runs_checkpoint_does_not_start_over_this_run(toy, finished_run, tmp_path, capsys):
    other = copy_of(finished_run, tmp_path / "other") / "checkpoints" / "step_00000003"
    before = snapshot(finished_run)
    capsys.readouterr()
    assert main(train_args(finished_run, [*toy, "train.steps=6"], "--resume", str(other))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run (checkpoints up to step_00000003)" in err[0], err
    assert snapshot(finished_run) == before
    # into a new run directory it starts from that checkpoint
    assert main(train_args(tmp_path / "new", [*toy, "train.steps=4"], "--resume", str(other))) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "new" / "metrics.jsonl") if "loss" in r] == [4]


def test_a_run_started_from_another_checkpoint_is_told_how_to_start_over(toy, finished_run, tmp_path, capsys):
    """A fine-tune stopped before its first checkpoint: --resume auto would start from random weights,
    so the advice names the files to remove to restart from the same checkpoint."""
    other = copy_of(finished_run, tmp_path / "other") / "checkpoints" / "step_00000003"
    run = copy_of(finished_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints")
    before = snapshot(run)
    capsys.readouterr()
    assert main(train_args(run, [*toy, "train.steps=6"], "--resume", str(other))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {run} already holds a run (config.toml, metrics.jsonl; no checkpoint yet) and --resume "
        f"{other} would start a new one over it: choose another --run-dir, or remove config.toml, "
        f"metrics.jsonl there to start it over from {other}"
    ]
    assert snapshot(run) == before


def test_finished_run_is_not_retrained(toy, finished_run, capsys):
    before = snapshot(finished_run)
    args = [
        "train",
        "--run-dir",
        str(finished_run),
        *sum((["--set", o] for o in [*toy, "train.steps=3"]), []),
    ]
    assert main(args) == 0
    assert "complete at step 3" in capsys.readouterr().out
    assert snapshot(finished_run) == before


def test_config_and_checkpoint_hold_the_resolved_config(finished_run):
    import tomllib

    saved = tomllib.loads((finished_run / "config.toml").read_text())
    assert saved["model"]["vocab_size"] == 512  # taken from the data's tokenizer
    assert saved["model"]["hidden_size"] == 64 and saved["train"]["steps"] == 3
    ckpt = tomllib.loads((finished_run / "checkpoints" / "step_00000003" / "config.toml").read_text())
    assert ckpt == saved
    assert os.path.isdir(finished_run / "checkpoints")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_a_run_dir_that_cannot_be_written_fails_before_any_work(toy, capsys):
    """/proc takes no new files, even from root: one line, naming the place, before data or model."""
    run = Path("/proc/seektrain_test_run")
    args = ["train", "--run-dir", str(run), *sum((["--set", o] for o in toy), [])]
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --run-dir {run}: cannot write in /proc (")


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_no_partial_copy(toy, tmp_path):
    """A run checkpointed at step 1 is resumed for a second step with files limited to half a checkpoint
    (RLIMIT_FSIZE: writes past it fail as on a full disk, while config.toml and metrics.jsonl stay far
    below it), so the step-2 checkpoint cannot be written: one line, exit 2, the temp dir gone, and once
    there is room the run resumes from step 1's checkpoint."""
    run = tmp_path / "run"
    overrides = [*toy, "checkpoint.every=1", "train.eval_every=0", "train.device=cpu"]
    first = cli(run, [*overrides, "train.steps=1"])
    done = subprocess.run(first, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    limit = (run / "checkpoints" / "step_00000001" / "state.pt").stat().st_size // 2
    overrides.append("train.steps=2")
    proc = subprocess.run(
        cli(run, overrides), capture_output=True, text=True, timeout=300, preexec_fn=file_size_limit(limit)
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert err[0].startswith(f"error: cannot write checkpoint {run / 'checkpoints' / 'step_00000002'} (")
    assert err[0].endswith("MiB free there); the checkpoints before it are intact")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]
    resumed = subprocess.run(cli(run, overrides), capture_output=True, text=True, timeout=300)  # room again
    assert resumed.returncode == 0, resumed.stderr
    assert "resum" in resumed.stdout and "step 1" in resumed.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]


@pytest.mark.parametrize(
    "limit, expected",
    [
        (1000, "error: --run-dir {run}: cannot write {run}/config.toml: File too large"),  # 1.5 kB
        (4000, "error: --run-dir {run}: cannot write {run}/tokenizer.json: File too large"),  # 21 kB
        (32000, "error: {run}/metrics.jsonl: File too large (checkpoints already written are intact)"),
    ],
    ids=["config", "tokenizer", "metrics"],
)
def test_a_run_file_that_cannot_be_written_is_one_line_naming_it(toy, tmp_path, limit, expected):
    """Files limited in size as on a full disk: config.toml or the tokenizer's copy at the start, or
    metrics.jsonl ~100 logged steps in (before any checkpoint). One line naming the file, exit 2, no
    temporary file left."""
    run = tmp_path / "run"
    overrides = [*toy, "train.steps=200", "train.log_every=1", "train.eval_every=0", "checkpoint.every=300"]
    proc = subprocess.run(
        cli(run, overrides), capture_output=True, text=True, timeout=300, preexec_fn=file_size_limit(limit)
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [expected.format(run=run)], proc.stderr
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]
