"""`megasft train`: the command line of the training stage.

Every TrainConfig setting is a flag (`--tp`, `--pp`, `--cp` for the parallel sizes, the field
name with dashes otherwise); flags override `--config RECIPE.yaml`, which overrides the
defaults. The settings are checked against the data and the model before anything heavy
starts. With `--nproc N` above 1 outside torchrun, the command starts torchrun itself with N
local ranks, each running `python -m megasft.train.worker` with the same settings.

Exit codes: 0 done; 2 a usage, input or configuration error, or a run stopped as unstable;
143 stopped by SIGTERM after writing a checkpoint (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import fields
from pathlib import Path

from megasft.train.config import TrainConfig, build_config, field_docs, flag_name

PREEMPTED_EXIT_CODE = 143


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and one flag per TrainConfig field, all defaulting to "not given"."""
    parser.add_argument("--config", metavar="RECIPE.yaml", help="a recipe: settings as YAML")
    docs = field_docs()
    for field in fields(TrainConfig):
        flag = flag_name(field.name)
        kind = str(field.type)
        help_text = docs.get(field.name, "")
        if kind.startswith("bool"):
            parser.add_argument(
                flag, dest=field.name, action=argparse.BooleanOptionalAction, help=help_text
            )
            continue
        value_type = int if kind.startswith("int") else float if kind.startswith("float") else str
        metavar = {int: "N", float: "X", str: "VALUE"}[value_type]
        if field.name in ("data", "load", "save"):
            metavar = "DIR"
        parser.add_argument(flag, dest=field.name, type=value_type, metavar=metavar, help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {field.name: getattr(args, field.name) for field in fields(TrainConfig)}
    return build_config(args.config, **overrides)


def add_train_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="supervised fine-tuning on megatron-core (torchrun, CPU or GPUs)",
        description=(
            "Fine-tune a converted megatron checkpoint (--load) on a prepared dataset (--data), "
            "writing checkpoints, metrics.jsonl and summary.json into --save. A --save "
            "directory that holds a checkpoint is resumed."
        ),
    )
    add_train_arguments(parser)
    parser.set_defaults(handler=run_train_command)


def run_train_command(args: argparse.Namespace) -> int:
    from megasft.megatron.cpu import accelerator_present
    from megasft.train.checks import plan_run
    from megasft.train.distributed import under_torchrun

    config = config_from_args(args)
    plan_run(config, on_accelerator=accelerator_present())  # fail before any process starts
    if config.nproc > 1 and not under_torchrun():
        return _launch(config)
    from megasft.train.worker import run_worker

    return run_worker(config)


def _launch(config: TrainConfig) -> int:
    from megasft.launch.local import LaunchError, run_torchrun
    from megasft.train.metrics import SUMMARY_FILE

    save = Path(config.save)
    # The ranks get the settings as a recipe of all of them: flags after torchrun's module
    # argument are still matched against torchrun's own options by prefix (--nproc would be
    # taken for its --nproc-per-node).
    settings = save / "logs" / "launch-config.yaml"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(config.to_yaml())
    started = time.time()
    previous = signal.signal(signal.SIGTERM, _forward_to_torchrun)
    try:
        run_torchrun(
            "megasft.train.worker", ["--config", str(settings)], config.nproc, save / "logs"
        )
    except LaunchError:
        summary = save / SUMMARY_FILE
        if (
            summary.is_file()
            and summary.stat().st_mtime >= started
            and json.loads(summary.read_text()).get("status") == "preempted"
        ):
            print("megasft train: stopped by SIGTERM; rerun to resume", file=sys.stderr)
            return PREEMPTED_EXIT_CODE
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _forward_to_torchrun(signum, frame) -> None:
    """SIGTERM to `megasft train --nproc N` goes on to torchrun, which passes it to every
    rank (and gives them 30 s to save a checkpoint); this process waits for them."""
    import psutil

    for child in psutil.Process().children():
        child.send_signal(signal.SIGTERM)
