"""The GPU path: packed sequences (THD with cu_seqlens) through Transformer Engine's or the torch
attention, bf16 with the distributed optimizer, fp32 with the torch attention. Skipped where no
CUDA/ROCm device is present; never run on the machines this was written on (see docs/train.md,
and bench/gpu_check.py for the one-shot check of a GPU machine)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megasft.megatron.attention import transformer_engine_installed
from tests.conftest import REPO

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm device"),
]

NEEDS_TE = pytest.mark.skipif(not transformer_engine_installed(), reason="needs Transformer Engine")
ATTENTIONS = ["torch", pytest.param("te", marks=NEEDS_TE)]


def _train(save: Path, data: Path, model: Path, *flags: str) -> list[dict]:
    """`megasft train` on one GPU; the step records of metrics.jsonl."""
    result = subprocess.run(
        [
            sys.executable, "-m", "megasft", "train", "--data", str(data), "--load", str(model),
            "--save", str(save), "--lr", "1e-3", "--require-accelerator", *flags,
        ],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_packed_bf16_training_on_one_gpu(workspace, tmp_path, attention):
    records = _train(
        tmp_path / "run", workspace.with_val, workspace.mcore_model, "--attention", attention,
        "--train-iters", "20", "--global-batch-size", "8", "--micro-batch-size", "2",
        "--warmup-iters", "2", "--precision", "bf16", "--eval-interval", "10",
    )  # fmt: skip
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    losses = [record["loss"] for record in records if "loss" in record]
    assert summary["status"] == "completed" and summary["skipped_steps"] == 0
    assert len(losses) == 20 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]
    assert [record["step"] for record in records if "val_loss" in record] == [10, 20]
    assert summary["tflops_per_device"] > 0


@pytest.mark.parametrize(
    ("attention", "precision"),
    [("torch", "bf16"), pytest.param("te", "bf16", marks=NEEDS_TE), ("torch", "fp32")],
)
def test_packed_rows_give_the_loss_of_the_same_examples_unpacked(
    workspace, tmp_path, attention, precision
):
    """All 48 examples in one step: packed into 16 rows, or one per row."""
    flags = ("--attention", attention, "--precision", precision, "--train-iters", "1")
    packed = _train(tmp_path / "packed", workspace.packed, workspace.mcore_model, *flags,
                    "--global-batch-size", "24", "--micro-batch-size", "4")  # fmt: skip
    unpacked = _train(tmp_path / "unpacked", workspace.unpacked, workspace.mcore_model, *flags,
                      "--global-batch-size", "48", "--micro-batch-size", "8")  # fmt: skip
    assert packed[0]["target_tokens"] == unpacked[0]["target_tokens"]
    tolerance = 1e-5 if precision == "fp32" else 1e-2
    assert abs(packed[0]["loss"] - unpacked[0]["loss"]) <= tolerance * unpacked[0]["loss"]
