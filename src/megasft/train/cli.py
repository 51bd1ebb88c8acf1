"""`megasft train`: the command line of the training stage.

Every TrainConfig setting is a flag (`--tp`, `--pp`, `--cp` for the parallel sizes, the field
name with dashes otherwise); flags override `--config RECIPE.yaml`, which overrides the
defaults. The command calls `megasft.train.stage.run_training`: the settings are checked
against the data and the model before anything heavy starts, and with `--nproc N` above 1
outside torchrun, torchrun is started with N local ranks, each running
`python -m megasft.train.worker` with the same settings.

Exit codes: 0 done; 2 a usage, input or configuration error, or a run stopped as unstable;
143 stopped by SIGTERM after writing a checkpoint (rerun the same command to resume).
"""

from __future__ import annotations

import argparse

from megasft.settings import add_options, given_settings
from megasft.train.config import TrainConfig, build_config


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config` and one flag per TrainConfig setting, all defaulting to "not given".

    Args:
        parser: the parser of `megasft train` or of a rank (`python -m megasft.train.worker`).
    """
    parser.add_argument("--config", metavar="RECIPE.yaml", help="a recipe: settings as YAML")
    add_options(parser, TrainConfig, layered=True)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The settings: defaults, then the `--config` recipe, then the flags given.

    Args:
        args: what a parser set up by `add_train_arguments` parsed.

    Returns:
        The validated TrainConfig.

    Raises:
        ConfigError: a bad setting, a bad recipe, or a required setting missing.
    """
    return build_config(args.config, **given_settings(TrainConfig, args))


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
    from megasft.train.stage import PREEMPTED_EXIT_CODE, run_training

    summary = run_training(config_from_args(args))
    return PREEMPTED_EXIT_CODE if summary.get("status") == "preempted" else 0
