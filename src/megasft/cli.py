"""The `megasft` command line: one subcommand per pipeline stage, each mapping to one function.

The flags are the contract in ARCHITECTURE.md; components, CI and benchmarks call these.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from megasft.errors import MegasftError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megasft",
        description="Supervised fine-tuning of LLMs with megatron-core.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from megasft.data.cli import add_prepare_command

    add_prepare_command(subparsers)
    from megasft.checkpoint.cli import add_convert_command

    add_convert_command(subparsers)
    from megasft.evaluate.cli import add_evaluate_command

    add_evaluate_command(subparsers)
    from megasft.train.cli import add_train_command

    add_train_command(subparsers)
    from megasft.plan.cli import add_plan_command

    add_plan_command(subparsers)
    from megasft.pipeline.cli import add_pipeline_command

    add_pipeline_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except MegasftError as error:
        print(f"megasft {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"megasft {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
