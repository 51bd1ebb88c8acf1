"""Runs megatron_worker.py once per session (one process, then two under torchrun) over every
tiny model family; the tests in this folder check what the runs wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megasft.checkpoint.convert import convert
from megasft.constants import ARCHITECTURE_FILE
from megasft.megatron.architecture import ModelArchitecture
from tests.checkpoint.tiny_models import TINY_MODELS, sample_tokens, save_tiny_model
from tests.megatron.settings import (
    CLIP_GRAD,
    GROUPED_MODEL,
    LEARNING_RATE,
    RESAVED_MODEL,
    TRAINING_MODEL,
)

WORKER = Path(__file__).with_name("megatron_worker.py")


def _run(command: list[str], description: str) -> None:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    if result.returncode != 0:
        pytest.fail(
            f"{description} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )


@pytest.fixture(scope="session")
def worker_runs(tmp_path_factory) -> Path:
    """The work directory after both worker runs."""
    work = tmp_path_factory.mktemp("megatron-worker")
    checkpoints = {}
    for name in TINY_MODELS:
        save_tiny_model(name, work / "hf" / name)
        convert("hf", "megatron", work / "hf" / name, work / "megatron" / name)
        checkpoints[name] = str(work / "megatron" / name)
    torch.save(sample_tokens(batch_size=4), work / "tokens.pt")
    spec = {
        "checkpoints": checkpoints,
        "moe_models": [
            name
            for name, checkpoint in checkpoints.items()
            if ModelArchitecture.load(Path(checkpoint) / ARCHITECTURE_FILE).moe is not None
        ],
        "grouped_model": GROUPED_MODEL,
        "training_checkpoint": checkpoints[TRAINING_MODEL],
        "resave_checkpoint": checkpoints[RESAVED_MODEL],
        "learning_rate": LEARNING_RATE,
        "clip_grad": CLIP_GRAD,
    }
    (work / "spec.json").write_text(json.dumps(spec))

    _run([sys.executable, str(WORKER), "reference", str(work)], "the one-process megatron run")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    _run(
        [*torchrun, str(WORKER), "parallel", str(work)],
        "the two-process megatron run (torchrun, gloo)",
    )
    return work
