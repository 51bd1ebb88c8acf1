"""`megasft prepare`: the command line of the tokenize-and-mask stage."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megasft.data.encode import ENCODER_CHOICES
from megasft.data.formats import FORMATS, parse_column_map
from megasft.data.masking import LOSS_ON_CHOICES, OVERLONG_CHOICES
from megasft.data.store import PREVIEW_FILE


def add_prepare_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="tokenize chat data and build assistant-only loss masks (tokenize-and-mask)",
        description=(
            "Render conversations with the tokenizer's chat template, tokenize them once, mask "
            "everything but the assistant's answers, pack them into sequences and write Arrow."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE",
        help="JSONL, JSON array or Parquet files, optionally gzip'd",
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        metavar="DIR",
        help="Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--format",
        default="auto",
        choices=("auto", *FORMATS),
        help="input format; auto detects it per file",
    )
    parser.add_argument(
        "--map",
        default="",
        metavar="FIELD=COLUMN,...",
        help="read a format's field from another column, "
        "e.g. prompt=question,response=answer for GSM8K",
    )
    parser.add_argument(
        "--seq-length", type=int, default=4096, metavar="N", help="longest sequence in tokens"
    )
    parser.add_argument(
        "--pack",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pack examples into sequences of --seq-length tokens",
    )
    parser.add_argument(
        "--loss-on",
        default="all-assistant",
        choices=LOSS_ON_CHOICES,
        help="which assistant turns are trained",
    )
    parser.add_argument(
        "--train-on-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train the end-of-turn token after each answer",
    )
    parser.add_argument(
        "--system-prompt",
        default=None,
        metavar="TEXT",
        help="system message for conversations that have none",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        metavar="F",
        help="share of examples held out for validation (by content hash)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="seeds the train/val split and the packing order",
    )
    parser.add_argument(
        "--on-error",
        default="skip",
        choices=("skip", "fail"),
        help="skip: write bad rows to rejects.jsonl and go on; fail: stop",
    )
    parser.add_argument(
        "--overlong",
        default="drop",
        choices=OVERLONG_CHOICES,
        help="what to do with examples longer than --seq-length",
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, metavar="N", help="tokenizer processes"
    )
    parser.add_argument(
        "--encoder",
        default="auto",
        choices=ENCODER_CHOICES,
        help="auto: tiktoken's BPE core where it gives the tokenizer's ids (byte-level BPE such "
        "as Qwen and Llama 3; about 3x faster), else the tokenizer; tokenizers: always the "
        "tokenizer",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the output directory if it exists"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from megasft.data.prepare import PrepareConfig, prepare

    config = PrepareConfig(
        inputs=tuple(args.input),
        tokenizer=args.tokenizer,
        output=args.output,
        format=args.format,
        column_map=tuple(parse_column_map(args.map).items()),
        seq_length=args.seq_length,
        pack=args.pack,
        loss_on=args.loss_on,
        train_on_eos=args.train_on_eos,
        system_prompt=args.system_prompt,
        val_fraction=args.val_fraction,
        seed=args.seed,
        on_error=args.on_error,
        workers=args.workers,
        overlong=args.overlong,
        encoder=args.encoder,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    manifest = prepare(config)
    print(summarize(manifest, Path(args.output)), file=sys.stderr)
    return 0


def summarize(manifest: dict, output: Path) -> str:
    lines = [
        f"prepared {manifest['examples']} examples from {manifest['rows_read']} rows "
        f"in {manifest['seconds']:.1f}s -> {output}",
    ]
    for split, stats in manifest["splits"].items():
        efficiency = stats["packing_efficiency"]
        lines.append(
            f"  {split:5s}: {stats['examples']} examples in {stats['rows']} rows, "
            f"{stats['tokens']} tokens, {stats['loss_tokens']} trained"
            + (f", packing efficiency {efficiency:.2%}" if efficiency is not None else "")
        )
    rejected = manifest["rejected"]
    if rejected["total"]:
        reasons = ", ".join(f"{reason} {count}" for reason, count in rejected["by_reason"].items())
        lines.append(f"  rejected {rejected['total']} rows ({reasons}): {output / 'rejects.jsonl'}")
    lines.append(f"  mask preview: {output / PREVIEW_FILE}")
    return "\n".join(lines)
