"""Evaluate a run: validation loss, perplexity and bits per byte on a data directory's val split, as JSON.

Every window of the split is scored (or the first --max-batches micro-batches) with the run's newest
checkpoint; the data directory defaults to the run's own (data.path) and must share its tokenizer.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run", required=True, metavar="DIR", help="run directory (its newest checkpoint is used)"
    )
    p.add_argument("--data", metavar="DIR", help="prepared data directory (default: the run's data.path)")
    p.add_argument("--split", default="val", help="split to score (default val)")
    p.add_argument("--seq-len", type=int, metavar="T", help="window length (default: the run's data.seq_len)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="windows per forward (default 8)")
    p.add_argument("--max-batches", type=int, default=0, metavar="N", help="score only N batches (0 = all)")
    p.add_argument("--checkpoint", metavar="DIR", help="a step_XXXXXXXX directory instead of the newest")
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available"
    )


def run(args: argparse.Namespace) -> int:
    from seektrain.distributed.env import pick_device
    from seektrain.host_limits import fit_torch_threads
    from seektrain.infer.evaluate import EvalConfig, evaluate_run
    from seektrain.train.metrics import strict_dumps

    device = pick_device(args.device)
    if device.type == "cpu":
        fit_torch_threads()  # at most one per CPU it may use, as the trainer runs
    cfg = EvalConfig(
        data=args.data,
        split=args.split,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        device=device,
    )
    print(strict_dumps(evaluate_run(args.run, cfg, checkpoint=args.checkpoint), indent=2))
    return 0
