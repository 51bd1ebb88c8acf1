"""The process torchrun starts for each rank: `python -m megasft.train.worker FLAGS`.

It takes the flags of `megasft train` and runs the recipe; `megasft train --nproc N` starts it
through torchrun, and a Kubeflow PyTorchJob starts it with torchrun on every node.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from megasft.errors import MegasftError
from megasft.train.config import TrainConfig

PREEMPTED_EXIT_CODE = 143


# Library notices that say nothing about this run: megatron-core on a machine without Apex or
# Transformer Engine (every CPU run), and deprecations inside megatron-core and torch's
# distributed checkpointing.
QUIET_WARNINGS = (
    r".*(Apex|Transformer Engine and Apex) (is|are) not installed.*",
    r"full scope is deprecated.*",
    r"`load_state_dict` is deprecated.*",
    r"Please use DTensor instead.*",
)


def run_worker(config: TrainConfig) -> int:
    """Train on this rank; returns the process exit code (see megasft.train.cli)."""
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    from megasft.train.recipe import Preempted, train

    try:
        train(config)
    except Preempted as stopped:
        print(f"megasft train: {stopped}; rerun the same command to resume", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0


def main(argv: list[str] | None = None) -> int:
    from megasft.train.cli import add_train_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="python -m megasft.train.worker")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_worker(config_from_args(args))
    except MegasftError as error:
        print(f"megasft train: error: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
