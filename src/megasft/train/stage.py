"""The training stage's entry point: `run_training(config) -> summary`.

It checks the settings against the data and the model (before anything heavy), then trains in
this process (one process, or when already under torchrun), or starts torchrun with
`config.nproc` local ranks, each running `python -m megasft.train.worker`. Either way it
returns the run's summary.json contents; `status` is "completed", or "preempted" when a
SIGTERM stopped the run after a checkpoint (run it again to resume).
"""

from __future__ import annotations

import json
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from megasft.train.config import TrainConfig
from megasft.train.metrics import SUMMARY_FILE

PREEMPTED_EXIT_CODE = 143
"""Exit status after a SIGTERM was handled by saving a checkpoint (128 + SIGTERM): the run is
not finished, and running the same command again resumes it."""

# Library notices that say nothing about this run: megatron-core on a machine without Apex or
# Transformer Engine (every CPU run), and deprecations inside megatron-core and torch's
# distributed checkpointing.
QUIET_WARNINGS = (
    r".*(Apex|Transformer Engine and Apex) (is|are) not installed.*",
    r"full scope is deprecated.*",
    r"`load_state_dict` is deprecated.*",
    r"Please use DTensor instead.*",
)


def run_training(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume) as `config` says; returns the summary. Raises ConfigError /
    InputError for bad settings or inputs, TrainingStopped for an unstable run, and
    LaunchError when a rank fails."""
    from megasft.megatron.cpu import accelerator_present
    from megasft.train.checks import plan_run
    from megasft.train.distributed import under_torchrun

    plan_run(config, on_accelerator=accelerator_present())  # fail before any process starts
    if config.nproc > 1 and not under_torchrun():
        return _launch(config)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    from megasft.train.recipe import Preempted, train

    try:
        return train(config)
    except Preempted as stopped:
        print(f"megasft train: {stopped}; run the same command to resume", file=sys.stderr)
        return stopped.summary


def _launch(config: TrainConfig) -> dict[str, Any]:
    from megasft.errors import LaunchError
    from megasft.train.torchrun import run_torchrun

    save = Path(config.save)
    # The ranks get the settings as a recipe of all of them: flags after torchrun's module
    # argument are still matched against torchrun's own options by prefix (--nproc would be
    # taken for its --nproc-per-node).
    settings = save / "logs" / "launch-config.yaml"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(config.to_yaml())
    summary = save / SUMMARY_FILE
    started = time.time()
    previous = signal.signal(signal.SIGTERM, _forward_to_torchrun)
    try:
        run_torchrun(
            "megasft.train.worker", ["--config", str(settings)], config.nproc, save / "logs"
        )
    except LaunchError:
        if _written_since(summary, started).get("status") == "preempted":
            print(
                "megasft train: stopped by SIGTERM; run the same command to resume", file=sys.stderr
            )
            return _written_since(summary, started)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return json.loads(summary.read_text())


def _written_since(path: Path, started: float) -> dict[str, Any]:
    if path.is_file() and path.stat().st_mtime >= started:
        return json.loads(path.read_text())
    return {}


def _forward_to_torchrun(signum, frame) -> None:
    """SIGTERM to `megasft train --nproc N` goes on to torchrun, which passes it to every
    rank (and gives them 30 s to save a checkpoint); this process waits for them."""
    import psutil

    for child in psutil.Process().children():
        child.send_signal(signal.SIGTERM)
