"""Import a Hugging Face DeepSeek-V3 directory (config.json, safetensors, tokenizer.json) as a run.

The run gets config.toml, tokenizer.json and a checkpoint at step 0, usable by generate, eval and export.
With --data (a data dir tokenized with the same tokenizer) the checkpoint is a complete trainer state, and
`seektrain train --config RUN/config.toml --run-dir RUN` continues training from the imported weights.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf", required=True, metavar="DIR", help="transformers model directory to import")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="new (or empty) run directory")
    p.add_argument("--data", metavar="DIR", help="prepared data dir to continue training on (same tokenizer)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run config override for later training, e.g. --set train.steps=100 (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    from seektrain.export import import_hf

    notes: list[str] = []
    out = import_hf(args.hf, args.out, data=args.data, overrides=args.overrides, notes=notes)
    follow = (
        f"seektrain train --config {out}/config.toml --run-dir {out}"
        if args.data
        else f"seektrain generate --run {out} --prompt … (to train on, import with --data DIR)"
    )
    print(f"imported {args.hf} as run {out}; next: {follow}")
    for note in notes:
        print(f"note: {note}")
    if not (out / "tokenizer.json").is_file():
        print(
            f"note: {args.hf} has no tokenizer.json: give generate and export `--tokenizer FILE`, "
            "and eval `--data DIR`"
        )
    return 0
