"""Prepare training data: read, clean, deduplicate, tokenize and shard raw text into a data dir.

Inputs are files or folders (recursive; .txt .md .py .rst …, optionally .gz), JSONL (--text-field) and
Parquet files, or the keyword `stdlib` (this Python's standard library, the default corpus). The data dir
holds tokenizer.json, manifest.json, train/*.bin, val/*.bin and prepare_report.json; it is replaced only
when the new one is complete. Use --num-slices/--slice-index on several machines and --merge to join.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        action="append",
        metavar="PATH|stdlib",
        help="file, folder or `stdlib`; repeat for several (default: stdlib)",
    )
    p.add_argument("--out", default=None, metavar="DIR", help="data dir to write (default: data/stdlib)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument(
        "--vocab-size", type=int, default=8192, metavar="N", help="train a byte-level BPE of N tokens"
    )
    tok.add_argument(
        "--tokenizer", metavar="FILE", help="use an existing tokenizer.json instead of training one"
    )
    p.add_argument(
        "--dedup",
        choices=["none", "exact", "minhash"],
        default="exact",
        help="exact: identical documents (after normalization); minhash: also near-duplicates",
    )
    p.add_argument(
        "--minhash-threshold",
        type=float,
        default=0.8,
        metavar="J",
        help="estimated Jaccard similarity of word 5-grams above which documents are near-duplicates",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        metavar="F",
        help="share of documents (chosen by content hash) held out for validation",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes for cleaning and tokenization (default and most: the CPUs it may use)",
    )
    p.add_argument(
        "--text-field", default="text", metavar="NAME", help="JSONL field / Parquet column with the text"
    )
    p.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="count and skip JSONL lines that are not JSON (default: stop with an error)",
    )
    p.add_argument(
        "--unicode",
        choices=["NFC", "NFKC", "NFD", "NFKD", "none"],
        help="Unicode normalization form (default NFC)",
    )
    p.add_argument("--min-chars", type=int, metavar="N", help="drop documents shorter than this (default 64)")
    p.add_argument(
        "--max-chars", type=int, metavar="N", help="drop documents longer than this (default 1000000)"
    )
    p.add_argument(
        "--no-repetition-filter", action="store_true", help="keep documents with repeated lines/n-grams"
    )
    p.add_argument(
        "--clean-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any CleanConfig field, e.g. max_dup_line_frac=0.3 or max_top_ngram_frac=2:0.2,3:0.18",
    )
    p.add_argument(
        "--special-tokens",
        default="<|bos|>,<|eos|>,<|pad|>",
        metavar="BOS,EOS,PAD",
        help="special tokens of a trained tokenizer (ids 0, 1, 2)",
    )
    p.add_argument("--shard-tokens", type=int, default=1 << 24, metavar="N", help="tokens per shard file")
    p.add_argument(
        "--num-slices",
        type=int,
        default=1,
        metavar="K",
        help="split the input files into K slices (one per machine); needs --tokenizer",
    )
    p.add_argument(
        "--slice-index", type=int, default=0, metavar="I", help="which slice this run prepares (0-based)"
    )
    p.add_argument("--merge", nargs="+", metavar="DIR", help="merge prepared slice dirs into --out instead")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from seektrain.data.clean import CleanConfig, clean_overrides
    from seektrain.data.prepare import PrepareConfig, prepare, print_summary
    from seektrain.errors import UserError

    if args.merge:
        from seektrain.data.merge import merge

        if args.out is None:
            raise UserError("--merge needs --out DIR")
        given = _options_given(args, keep={"merge", "out", "no_progress", "workers"})
        if given:
            raise UserError(
                f"--merge joins slices as they were prepared: drop {', '.join(given)} "
                "(a merge takes --out, and their tokenizer and options)"
            )
        print_summary(merge(args.merge, args.out))
        return 0
    options = clean_overrides(args.clean_option)
    flags = {  # the cleaning options given by their own flags (their defaults are CleanConfig's)
        "--unicode": ("unicode_form", args.unicode),
        "--min-chars": ("min_chars", args.min_chars),
        "--max-chars": ("max_chars", args.max_chars),
        "--no-repetition-filter": ("repetition_filters", False if args.no_repetition_filter else None),
    }
    by_flag = {field: value for field, value in flags.values() if value is not None}
    for flag, (field, value) in flags.items():
        if value is not None and field in options:
            raise UserError(f"{flag} and --clean-option {field}=… both set {field}: give it once")
    clean = CleanConfig(**by_flag, **options)
    cfg = PrepareConfig(
        inputs=args.input or ["stdlib"],
        out_dir="data/stdlib" if args.out is None else args.out,
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        dedup=args.dedup,
        minhash_threshold=args.minhash_threshold,
        val_fraction=args.val_fraction,
        workers=args.workers,
        text_field=args.text_field,
        skip_bad_lines=args.skip_bad_lines,
        shard_tokens=args.shard_tokens,
        num_slices=args.num_slices,
        slice_index=args.slice_index,
        clean=clean,
        special_tokens=tuple(t.strip() for t in args.special_tokens.split(",")),
        progress=not args.no_progress,
    )
    print_summary(prepare(cfg))
    return 0


def _options_given(args: argparse.Namespace, keep: set[str]) -> list[str]:
    """This verb's options (as flags) whose values differ from their defaults, except those in `keep`."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    return [
        "--" + name.replace("_", "-")
        for name, default in defaults.items()
        if name not in keep and getattr(args, name, default) != default
    ]
