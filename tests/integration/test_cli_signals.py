"""Ctrl-C and SIGTERM that arrive while Python imports a module (the commands import torch and numpy
lazily, in their first second) take effect once the import is done: raised inside it, they left half-built
modules behind, and the way out failed with a traceback (`module 'numpy' has no attribute 'multiply'`,
`cannot load module more than once per process`) or the command went on and exited 0."""

import signal
import subprocess
import sys

import pytest

HEADER = """
import sys, time
from seektrain import cli
sys.path.insert(0, sys.argv[1])
"""


def run_script(tmp_path, module: str, script: str) -> list[str]:
    """Run `script` (HEADER first) in a fresh interpreter, with `module` importable as slow_import; its
    printed lines. It must end normally and print no traceback."""
    (tmp_path / "slow_import.py").write_text(module)
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize("name, raised", [("SIGTERM", "Terminated"), ("SIGINT", "KeyboardInterrupt")])
def test_a_signal_during_an_import_stops_the_command_after_it(tmp_path, name, raised):
    module = f"""
import os, signal, time
before_the_signal = True
os.kill(os.getpid(), signal.{name})
time.sleep(0.2)  # a Python handler runs in here, at the next bytecode
after_the_signal = True
"""
    script = HEADER + """
from seektrain.errors import Terminated

cli._handle_signals()
try:
    import slow_import  # its body sends the signal to this process half-way through
    print("imported whole:", slow_import.after_the_signal)
    time.sleep(10)
    print("never stopped")
except KeyboardInterrupt:
    print("stopped: KeyboardInterrupt")
except Terminated:
    print("stopped: Terminated")
"""
    assert run_script(tmp_path, module, script) == ["imported whole: True", f"stopped: {raised}"]


def test_an_ignored_ctrl_c_stays_ignored():
    """A background job (`cmd &` in a script) starts with SIGINT ignored: the CLI does not take it up."""
    code = "import signal; from seektrain import cli; cli._handle_signals(); print(signal.getsignal(2) == 1)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert result.stdout.strip() == "True", result


def test_under_a_launcher_only_rank_zero_says_interrupted(tmp_path):
    """Ctrl-C under torchrun reached every rank, and each printed `interrupted`: errors are printed once
    per launch, by rank 0, and so is this now: prepare run as rank 0 and as rank 1 (RANK set)."""
    import os
    import time

    argv = ["prepare", "--input", "stdlib", "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"]
    outputs = {}
    for rank in ("0", "1"):
        proc = subprocess.Popen(
            [sys.executable, "-m", "seektrain", *argv],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "RANK": rank},
        )
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".out.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # into the cleaning pass
        proc.send_signal(signal.SIGINT)
        outputs[rank] = (proc.wait(timeout=60), proc.stderr.read())
    assert outputs == {"0": (130, "interrupted\n"), "1": (130, "")}, outputs


def test_ctrl_c_pressed_again_while_an_import_finishes_is_not_replayed_into_the_cleanup(tmp_path):
    """Each Ctrl-C that came during the import started its own retries, which all fired once it was done:
    the first stopped the command, the next ones cut its cleanup short (a temp dir left behind)."""
    module = """
import os, signal, time
for _ in range(3):  # a user pressing Ctrl-C again, as nothing seems to happen
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
after_the_signals = True
"""
    script = HEADER + """
cli._handle_signals()
try:
    import slow_import
    print("imported whole:", slow_import.after_the_signals)
    time.sleep(10)
except KeyboardInterrupt:
    print("stopped")
    time.sleep(0.5)  # the command's cleanup
    print("cleanup done")
"""
    assert run_script(tmp_path, module, script) == ["imported whole: True", "stopped", "cleanup done"]


@pytest.mark.parametrize("case", ["an import that never ends", "the caller inside an import"])
def test_a_signal_is_not_deferred_forever(tmp_path, case):
    """An import that hangs (a stuck network filesystem) is interrupted after IMPORT_WAIT_MAX_S; and where
    `main` itself runs inside an import (a module that calls it at import time), that import is not one
    to wait for, or every signal would be deferred until the command ends."""
    hangs = case == "an import that never ends"
    module = """
import os, signal, time
from seektrain import cli
""" + ("" if hangs else "cli._handle_signals()\n") + """
os.kill(os.getpid(), signal.SIGINT)
for _ in range(100):
    time.sleep(0.05)
after_the_signal = True
"""
    script = HEADER + ("cli.IMPORT_WAIT_MAX_S = 0.3\ncli._handle_signals()\n" if hangs else "") + """
try:
    import slow_import
    print("imported whole")
except KeyboardInterrupt:
    print("stopped")
"""
    assert run_script(tmp_path, module, script) == ["stopped"]


def test_a_retry_pending_when_ctrl_c_comes_again_is_dropped(tmp_path):
    """Ctrl-C again just after the import, before the retry of the first one fired: it stopped the
    command at once, and the retry then fired into the cleanup."""
    module = "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n"  # its retry comes 50 ms later
    script = HEADER + """
import os, signal
cli._handle_signals()
try:
    import slow_import
    os.kill(os.getpid(), signal.SIGINT)  # at once, before the retry
    time.sleep(10)
except KeyboardInterrupt:
    print("stopped")
    time.sleep(0.3)  # the command's cleanup
    print("cleanup done")
"""
    assert run_script(tmp_path, module, script) == ["stopped", "cleanup done"]


def test_a_signal_deferred_past_an_import_reaches_a_handler_set_after_it(tmp_path):
    """The trainer sets its own SIGTERM handler (checkpoint, then stop) after importing TensorBoard: a
    SIGTERM that came during that import was dropped, and the run went on until SIGKILL."""
    module = "import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.1)\n"
    script = HEADER + """
import signal
cli._handle_signals()
import slow_import
signal.signal(signal.SIGTERM, lambda signum, frame: print("the trainer's handler got it"))
time.sleep(0.5)
"""
    assert run_script(tmp_path, module, script) == ["the trainer's handler got it"]


def test_release_restores_the_handlers_and_leaves_other_threads_state_alone(tmp_path):
    """A retry's signal raised while `main` cancelled the retries skipped the restore (the CLI's handlers
    stayed, and the next `main` would not take SIGINT up again); `main` run off the main thread cancelled
    the main thread's deferred Ctrl-C."""
    script = HEADER + """
import signal, threading
previous = cli._handle_signals()
cli._timers[signal.SIGINT] = "pending"  # stands for a Ctrl-C the main thread deferred past an import
worker = threading.Thread(target=cli._release_signals, args=({},))
worker.start()
worker.join()
print("kept" if signal.SIGINT in cli._timers else "lost")
cli._timers.clear()

def interrupted():
    raise KeyboardInterrupt

cli._cancel_retries = interrupted  # a retry's signal, raised while they are cancelled
try:
    cli._release_signals(previous)
except KeyboardInterrupt:
    pass
print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, cli._caller is None)
"""
    assert run_script(tmp_path, "", script) == ["kept", "True True"]
