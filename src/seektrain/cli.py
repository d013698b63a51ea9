"""`seektrain VERB …`: one subcommand per module in `seektrain.commands`, each a plain function.

User mistakes raise `UserError` and end as one `error: …` line with exit code 2; `--debug` shows the
traceback instead. Command modules import torch lazily so that `seektrain --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from seektrain.errors import UserError

# verb -> module in seektrain.commands; each module has `add_arguments(parser)` and `run(args) -> int`.
COMMANDS = {
    "prepare": "prepare",
    "train": "train",
    "eval": "evaluate",
    "generate": "generate",
    "export": "export",
    "import": "import_hf",
    "bench": "bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seektrain",
        description="Train DeepSeek-V3-style language models: prepare → train → eval, generate, export.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one error line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for verb, module_name in COMMANDS.items():
        module = importlib.import_module(f"seektrain.commands.{module_name}")
        p = sub.add_parser(verb, help=module.__doc__.splitlines()[0], description=module.__doc__)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
