"""`megasft evaluate`: the command line of the evaluation stage.

One flag per EvaluateConfig setting (megasft.evaluate.config), made by megasft.settings, and
`--fail-on-gate`. Exit codes: 0 done (and the gate passed, or was not enforced); 1 the gate
failed under `--fail-on-gate`; 2 a usage or input error (from `megasft.cli`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megasft.evaluate.config import EvaluateConfig
from megasft.settings import add_options, given_settings

GATE_FAILED_EXIT_CODE = 1


def add_evaluate_command(subparsers: argparse._SubParsersAction) -> None:
    """Register `evaluate` on the root parser's subparsers.

    Args:
        subparsers: what `add_subparsers` returned on the root parser.
    """
    parser = subparsers.add_parser(
        "evaluate",
        help="validation loss, generation and task metrics, tuned vs base, with a gate",
        description=(
            "Evaluate a fine-tuned model (and optionally its base): validation loss on a "
            "prepared dataset, greedy answers to the prompts of a data file scored by a task, "
            "and a pass/fail gate. Writes metrics.json, samples.jsonl and report.html."
        ),
    )
    add_options(parser, EvaluateConfig)
    parser.add_argument(
        "--fail-on-gate",
        action="store_true",
        help=f"exit with code {GATE_FAILED_EXIT_CODE} when the gate fails",
    )
    parser.set_defaults(handler=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    """Run the stage with the parsed flags and print its summary; returns the exit code.

    Raises:
        ConfigError: `--fail-on-gate` without `--gate`, or a bad setting.
    """
    from megasft.errors import ConfigError
    from megasft.evaluate.stage import evaluate, summarize

    if args.fail_on_gate and not args.gate:
        raise ConfigError("--fail-on-gate needs a --gate to enforce")
    config = EvaluateConfig(**given_settings(EvaluateConfig, args))
    metrics = evaluate(config)
    print(summarize(metrics, Path(config.output)), file=sys.stderr)
    gate = metrics["gate"]
    if args.fail_on_gate and gate is not None and not gate["passed"]:
        return GATE_FAILED_EXIT_CODE
    return 0
