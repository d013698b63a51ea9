"""Ctrl-C and SIGTERM that arrive while Python imports a module (the commands import torch and numpy
lazily, in their first second) take effect once the import is done: raised inside it, they left half-built
modules behind, and the way out failed with a traceback (`module 'numpy' has no attribute 'multiply'`,
`cannot load module more than once per process`) or the command went on and exited 0."""

import signal
import subprocess
import sys

import pytest

SCRIPT = """
import os, signal, sys, time
from seektrain import cli
from seektrain.errors import Terminated

cli._handle_signals()
sys.path.insert(0, sys.argv[1])
try:
    import signals_itself  # its body sends the signal to this process half-way through
    print("imported whole:", signals_itself.after_the_signal)
    time.sleep(10)
    print("never stopped")
except KeyboardInterrupt:
    print("stopped: KeyboardInterrupt")
except Terminated:
    print("stopped: Terminated")
"""

MODULE = """
import os, signal, time
before_the_signal = True
os.kill(os.getpid(), signal.{name})
time.sleep(0.2)  # a Python handler runs in here, at the next bytecode
after_the_signal = True
"""


@pytest.mark.parametrize("name, raised", [("SIGTERM", "Terminated"), ("SIGINT", "KeyboardInterrupt")])
def test_a_signal_during_an_import_stops_the_command_after_it(tmp_path, name, raised):
    (tmp_path / "signals_itself.py").write_text(MODULE.format(name=name))
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.splitlines() == ["imported whole: True", f"stopped: {raised}"], result
    assert result.returncode == 0 and "Traceback" not in result.stderr


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
