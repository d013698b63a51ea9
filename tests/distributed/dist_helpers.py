"""Helpers for the multi-rank tests: toy overrides, `launch` (2 gloo ranks under torchrun, as users
launch them: `python -m torch.distributed.run --standalone`), and readers of a run's metrics."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
LAUNCH_TIMEOUT_S = 180  # a deadlock fails the test instead of hanging the suite

TOY = [
    "model.num_hidden_layers=2",
    "model.first_k_dense_replace=1",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.moe_intermediate_size=32",
    "model.num_attention_heads=2",
    "model.q_lora_rank=32",
    "model.kv_lora_rank=32",
    "model.qk_nope_head_dim=16",
    "model.qk_rope_head_dim=8",
    "model.v_head_dim=16",
    "model.n_routed_experts=8",
    "model.num_experts_per_tok=2",
    "model.n_group=2",
    "model.topk_group=1",
    "model.num_mtp_layers=1",
    "data.seq_len=32",
    # 2 micro-batches per rank on 2 ranks: gradient accumulation with deferred sync is exercised too
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.steps=8",
    "train.log_every=1",
    "train.eval_every=4",
    "train.eval_batches=4",
    "train.bias_update_speed=0.01",
    "checkpoint.every=4",
    "optim.warmup_steps=2",
    "log.progress=false",
    "log.tensorboard=false",
]


def launch(args: list[str], nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N ARGS` (ARGS: `-m seektrain train …` or a script)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


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
