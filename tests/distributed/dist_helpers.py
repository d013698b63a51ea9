"""Helpers for the multi-rank tests: toy overrides, `launch` (2 gloo ranks under torchrun, as users
launch them: `python -m torch.distributed.run --standalone`), and readers of a run's metrics."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

from toy_model import TOY_MODEL

HERE = pathlib.Path(__file__).resolve().parent
LAUNCH_TIMEOUT_S = 180  # a deadlock fails the test instead of hanging the suite

TOY = [
    *TOY_MODEL,
    "model.num_mtp_layers=1",
    "data.seq_len=32",
    # 2 micro-batches per rank on 2 ranks: gradient accumulation with deferred sync is exercised too
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.steps=8",
    "train.log_every=1",
    "train.eval_every=4",
    "train.eval_batches=3",  # not a multiple of the ranks: they must still score 3 micro-batches in all
    "train.bias_update_speed=0.01",
    "checkpoint.every=4",
    "optim.warmup_steps=2",
    "log.progress=false",
    "log.tensorboard=false",
]


def launch(
    args: list[str], nproc: int = 2, check: bool = True, preexec_fn=None
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N ARGS` (ARGS: `-m seektrain train …` or a script);
    `preexec_fn` runs in torchrun's process before it starts, so the ranks inherit what it sets."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    # torchrun leaves a torchelastic_* folder in TMPDIR per launch: a suite's ~40 piled up in /tmp
    with tempfile.TemporaryDirectory(prefix="launch-") as tmp:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": tmp}
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env, preexec_fn=preexec_fn
        )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def exit_codes(torchrun_stderr: str) -> dict[int, int]:
    """rank -> exit code of each rank that torchrun's failure summary lists (signals negative)."""
    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank.*\n\s*exitcode\s*:\s*(-?\d+)", torchrun_stderr)
    return {int(rank): int(code) for rank, code in found}


def worker(run_dir: pathlib.Path, overrides: list[str], resume: str = "auto", *extra: str) -> list[str]:
    """torchrun arguments for worker.py: train, then record every rank's expert biases."""
    sets = [a for o in overrides for a in ("--set", o)]
    return [str(HERE / "worker.py"), "--run-dir", str(run_dir), "--resume", resume, *sets, *extra]


def losses(run_dir: pathlib.Path) -> dict[int, dict]:
    """step -> train metrics line of a run."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "loss" in r}


def val_losses(run_dir: pathlib.Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in lines if "val_loss" in r}
