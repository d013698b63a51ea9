"""Export a run as a Hugging Face directory that transformers (AutoModelForCausalLM, AutoTokenizer) loads.

Writes config.json (model_type deepseek_v3), model.safetensors (sharded with an index above
--max-shard-gb), the tokenizer files and generation_config.json. The target must be new or empty; it
appears only once complete.
"""

from __future__ import annotations

import argparse
import math


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run", required=True, metavar="DIR", help="run directory (its newest checkpoint is exported)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="new (or empty) output directory")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="weight dtype (default bf16)")
    p.add_argument(
        "--max-shard-gb", type=float, default=5.0, metavar="G", help="shard size limit (default 5)"
    )
    p.add_argument("--checkpoint", metavar="DIR", help="a step_XXXXXXXX directory instead of the newest")
    p.add_argument(
        "--tokenizer", metavar="FILE", help="tokenizer.json to ship (default: the run's, else its data's)"
    )


def run(args: argparse.Namespace) -> int:
    from seektrain.errors import UserError
    from seektrain.export import export_run
    from seektrain.host_limits import fit_torch_threads

    fit_torch_threads()  # it runs on CPU: at most one per CPU it may use, as the trainer runs
    if not (args.max_shard_gb > 0 and math.isfinite(args.max_shard_gb)):  # also rejects nan
        raise UserError(f"--max-shard-gb must be a finite positive number, got {args.max_shard_gb}")
    out = export_run(
        args.run,
        args.out,
        dtype=args.dtype,
        checkpoint=args.checkpoint,
        max_shard_bytes=int(args.max_shard_gb * 2**30),
        tokenizer_file=args.tokenizer,
    )
    print(
        f"exported {args.run} to {out} ({args.dtype}); load it with "
        f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})"
    )
    return 0
