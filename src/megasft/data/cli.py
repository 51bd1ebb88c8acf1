"""`megasft prepare`: the command line of the tokenize-and-mask stage.

One flag per PrepareConfig setting (megasft.data.config), made by megasft.settings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megasft.data.config import PrepareConfig
from megasft.data.store import PREVIEW_FILE
from megasft.settings import add_options, given_settings


def add_prepare_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `prepare` on the root parser's subparsers.

    Args:
        subparsers: what `add_subparsers` returned on the root parser.
    """
    parser = subparsers.add_parser(
        "prepare",
        help="tokenize chat data and build assistant-only loss masks (tokenize-and-mask)",
        description=(
            "Render conversations with the tokenizer's chat template, tokenize them once, mask "
            "everything but the assistant's answers, pack them into sequences and write Arrow."
        ),
    )
    add_options(parser, PrepareConfig)
    parser.set_defaults(handler=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    """Run the stage with the parsed flags and print its summary; returns the exit code."""
    from megasft.data.prepare import prepare

    config = PrepareConfig(**given_settings(PrepareConfig, args))
    manifest = prepare(config)
    print(summarize(manifest, Path(config.output)), file=sys.stderr)
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
