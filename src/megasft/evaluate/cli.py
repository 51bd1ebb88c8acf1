"""`megasft evaluate`: the command line of the evaluation stage.

Exit codes: 0 done (and the gate passed, or was not enforced); 1 the gate failed under
`--fail-on-gate`; 2 a usage or input error (from `megasft.cli`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megasft.data.formats import FORMATS, parse_column_map
from megasft.evaluate.metrics import known_gate_metrics
from megasft.evaluate.tasks import task_names

GATE_FAILED_EXIT_CODE = 1
# megasft.evaluate.model.DTYPES, spelled out so that building the CLI does not import torch.
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def add_evaluate_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="validation loss, generation and task metrics, tuned vs base, with a gate",
        description=(
            "Evaluate a fine-tuned model (and optionally its base): validation loss on a "
            "prepared dataset, greedy answers to the prompts of a data file scored by a task, "
            "and a pass/fail gate. Writes metrics.json, samples.jsonl and report.html."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="the model: a Hugging Face directory or a megatron checkpoint",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="FILE_OR_DATA_DIR",
        help="prompts with references (any prepare input format); or a prepare output "
        "directory, for the validation loss only",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--task", default="exact-match", choices=task_names(), help="how answers are scored"
    )
    parser.add_argument("--baseline", metavar="DIR", help="the base model to compare with")
    parser.add_argument(
        "--max-new-tokens", type=int, default=512, metavar="N", help="longest answer in tokens"
    )
    parser.add_argument(
        "--val-data",
        metavar="DIR",
        help="a prepare output directory: compute validation loss and perplexity on it",
    )
    parser.add_argument(
        "--val-split", default="val", choices=("val", "train"), help="split of --val-data"
    )
    parser.add_argument(
        "--gate",
        metavar="CONDITIONS",
        help="pass/fail conditions METRIC OP NUMBER, comma-separated, e.g. "
        "accuracy>=0.5,delta_accuracy>0; metrics: " + ", ".join(known_gate_metrics()),
    )
    parser.add_argument(
        "--fail-on-gate",
        action="store_true",
        help=f"exit with code {GATE_FAILED_EXIT_CODE} when the gate fails",
    )
    parser.add_argument(
        "--format-pattern",
        metavar="REGEX",
        help="a well-formed answer matches this (re.search); required for --task format; "
        "defaults per task",
    )
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory for --model")
    parser.add_argument(
        "--convert-base",
        metavar="DIR",
        help="for a megatron --model: the HF model it came from, for config and tokenizer "
        "(default: the copies stored in the checkpoint)",
    )
    parser.add_argument(
        "--format", default="auto", choices=("auto", *FORMATS), help="format of the --data file"
    )
    parser.add_argument(
        "--map",
        default="",
        metavar="FIELD=COLUMN,...",
        help="read a format's field from another column, e.g. prompt=question,response=answer",
    )
    parser.add_argument(
        "--reference-field",
        metavar="COLUMN",
        help="take the reference from this column instead of the final assistant turn",
    )
    parser.add_argument(
        "--system-prompt", metavar="TEXT", help="system message for prompts that have none"
    )
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate the first N prompts only")
    parser.add_argument(
        "--batch-size", type=int, default=8, metavar="N", help="prompts generated together"
    )
    parser.add_argument(
        "--val-batch-tokens",
        type=int,
        default=4096,
        metavar="N",
        help="tokens per validation forward pass",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="torch seed")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", *DTYPE_CHOICES),
        help="auto: bfloat16 on an accelerator, float32 on CPU",
    )
    parser.add_argument(
        "--chatml-fallback",
        action="store_true",
        help="evaluate a tokenizer without a chat template with ChatML (as prepare does)",
    )
    parser.add_argument(
        "--training-log",
        metavar="FILE",
        help="JSON Lines with step and loss per line (the trainer's metrics.jsonl), drawn in "
        "the report",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the output directory if it exists"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from megasft.errors import ConfigError
    from megasft.evaluate.stage import EvaluateConfig, evaluate, summarize

    if args.fail_on_gate and not args.gate:
        raise ConfigError("--fail-on-gate needs a --gate to enforce")
    config = EvaluateConfig(
        model=args.model,
        data=args.data,
        output=args.output,
        task=args.task,
        baseline=args.baseline,
        max_new_tokens=args.max_new_tokens,
        val_data=args.val_data,
        val_split=args.val_split,
        tokenizer=args.tokenizer,
        convert_base=args.convert_base,
        format=args.format,
        column_map=tuple(parse_column_map(args.map).items()),
        system_prompt=args.system_prompt,
        reference_field=args.reference_field,
        format_pattern=args.format_pattern,
        gate=args.gate,
        limit=args.limit,
        batch_size=args.batch_size,
        val_batch_tokens=args.val_batch_tokens,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        chatml_fallback=args.chatml_fallback,
        training_log=args.training_log,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    metrics = evaluate(config)
    print(summarize(metrics, Path(args.output)), file=sys.stderr)
    gate = metrics["gate"]
    if args.fail_on_gate and gate is not None and not gate["passed"]:
        return GATE_FAILED_EXIT_CODE
    return 0
