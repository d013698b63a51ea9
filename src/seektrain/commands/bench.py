"""Time training steps of a preset (tokens/s, TFLOP/s, MFU, peak memory) on the present device.

Forward, backward, clipping and the optimizer step are timed after warm-up; no MFU on CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from seektrain.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="model preset (default: small on GPU, tiny on CPU)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: 8 on GPU, 4 on CPU)")
    p.add_argument("--seq", type=int, default=None,
                   help="tokens per sequence (default: 2048 on GPU, 256 on CPU)")
    p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "auto"], default="auto",
                   help="default auto: bf16 where the device computes it natively, else fp32 (as "
                   "train.precision=auto)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each block and the loss head (default: on a GPU, as the `small` "
                   "preset trains; --no-compile for eager)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="GPU only: compile each block (implies --compile) and replay it as CUDA graphs")
    p.add_argument("--activation-checkpointing", nargs="?", const="full", default="none",
                   choices=["none", "full", "selective"],
                   help="recompute activations in the backward: full (the flag alone) or selective")
    p.add_argument("--dense", action="store_true", help="MoE off: every layer a dense SwiGLU MLP")
    p.add_argument("--optimizer-states", choices=["fp32", "bf16"], default="fp32",
                   help="AdamW's moments in fp32 (default) or bf16 (optim.state_dtype)")
    p.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    p.add_argument("--mtp", type=int, default=0,
                   help="MTP depth (default 0, like the transformers peer; its FLOPs are not counted)")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after timing, profile one step and print its top ROWS ops by device time (stderr)")
    p.add_argument("--trace", default=None, metavar="PATH",
                   help="with --profile: also write the profiled step's timeline as a Chrome trace (JSON)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    import torch

    from seektrain.bench import BenchConfig, run_bench
    from seektrain.model.config import ModelConfig

    gpu = torch.cuda.is_available()
    preset = args.preset or ("small" if gpu else "tiny")
    if preset not in ModelConfig.preset_names():
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(ModelConfig.preset_names())}")
    for name in ("batch", "seq", "steps", "layers"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name} must be positive, got {value}")
    for name in ("warmup", "profile", "mtp"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if args.trace == "":
        raise UserError("--trace needs a file path")
    if args.trace is not None and not args.profile:
        raise UserError("--trace writes the profiled step's timeline: add --profile ROWS")
    if args.trace is not None:
        check_trace_target(args.trace)
    if args.cuda_graphs and not gpu:
        raise UserError("--cuda-graphs needs a CUDA GPU; this machine has none")
    if args.cuda_graphs and args.compile is False:
        raise UserError("--cuda-graphs replays the compiled blocks: drop --no-compile")
    if args.cuda_graphs and args.activation_checkpointing != "none":
        raise UserError("--cuda-graphs with activation checkpointing is not supported yet")
    cfg = BenchConfig(
        preset=preset,
        batch=args.batch or (8 if gpu else 4),
        seq=args.seq or (2048 if gpu else 256),
        steps=args.steps,
        warmup=args.warmup,
        precision=args.precision,
        compile=(gpu if args.compile is None else args.compile) or args.cuda_graphs,
        cuda_graphs=args.cuda_graphs,
        activation_checkpointing=args.activation_checkpointing,
        dense=args.dense,
        state_dtype=args.optimizer_states,
        layers=args.layers,
        mtp=args.mtp,
        profile=args.profile,
        trace=args.trace,
    )
    result = run_bench(cfg)
    table = result.pop("profile", None)
    if table:
        print(table, file=sys.stderr)
    if args.json:
        print(json.dumps(result))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"seektrain bench: {result['preset']} on {result['device']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, "—" if value is None else str(value))
    Console().print(table)
    return 0


def check_trace_target(trace: str) -> None:
    """The trace is written after the whole benchmark: a path that cannot take it fails now, with one
    line. The folder is probed with a file that vanishes on close, since permission bits say nothing to
    root and nothing about a read-only or special filesystem."""
    path = Path(trace)
    folder = path.resolve().parent
    if path.is_dir():
        raise UserError(f"--trace {trace} is a directory: name a file, e.g. {path / 'trace.json'}")
    if not folder.is_dir():
        what = "is not a directory" if folder.exists() else "does not exist"
        raise UserError(f"--trace {trace}: {folder} {what}")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"--trace {trace}: cannot write in {folder}: {e.strerror}") from e
