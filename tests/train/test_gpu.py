"""The GPU path: Transformer Engine layers, packed sequences as THD with cu_seqlens, bf16 with
the distributed optimizer. Skipped where no CUDA/ROCm device is present (never run on the
machines this was written on; see docs/train.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from tests.train.workspace import make_workspace

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm device"),
]


def test_packed_bf16_training_on_one_gpu(tmp_path):
    pytest.importorskip("transformer_engine")
    workspace = make_workspace(tmp_path / "inputs")
    save = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable, "-m", "megasft", "train",
            "--data", str(workspace.with_val), "--load", str(workspace.mcore_model),
            "--save", str(save), "--train-iters", "20", "--global-batch-size", "8",
            "--micro-batch-size", "2", "--lr", "1e-3", "--warmup-iters", "2",
            "--precision", "bf16", "--eval-interval", "10",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((save / "summary.json").read_text())
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if record["kind"] == "train"]
    assert summary["status"] == "completed" and summary["skipped_steps"] == 0
    assert losses[-1] < losses[0]
    assert summary["tflops_per_device"] > 0
