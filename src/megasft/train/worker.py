"""The process torchrun starts for each rank: `python -m megasft.train.worker FLAGS`.

It takes the flags of `megasft train` and runs the recipe; `megasft train --nproc N` starts it
through torchrun, and a Kubeflow PyTorchJob starts it with torchrun on every node.
"""

from __future__ import annotations

import argparse
import sys

from megasft.errors import MegasftError
from megasft.train.config import TrainConfig
from megasft.train.stage import PREEMPTED_EXIT_CODE


def run_worker(config: TrainConfig) -> int:
    """Train on this rank; returns the process exit code (see megasft.train.cli)."""
    from megasft.train.stage import run_training

    summary = run_training(config)
    return PREEMPTED_EXIT_CODE if summary.get("status") == "preempted" else 0


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
