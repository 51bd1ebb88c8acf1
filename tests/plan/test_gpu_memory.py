"""The plan against a GPU: one `megasft train` step of a 0.2 B-parameter Llama in bf16 with
Transformer Engine, its summary's peak memory against `megasft plan`'s figures without the
allowance. Skipped where no CUDA/ROCm device is present (not run where this was written; see
docs/plan.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megasft.checkpoint.convert import convert
from tests.conftest import REPO
from tests.train.workspace import make_workspace

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm device"),
]


def _megasft(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megasft", *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )


def test_plan_is_within_a_fifth_of_the_measured_peak(tmp_path):
    pytest.importorskip("transformer_engine")
    from transformers import LlamaConfig, LlamaForCausalLM

    workspace = make_workspace(tmp_path / "inputs")
    config = LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    convert("hf", "megatron", tmp_path / "hf", tmp_path / "mcore")
    settings = ["--data", str(workspace.packed), "--load", str(tmp_path / "mcore"),
                "--micro-batch-size", "4", "--global-batch-size", "4", "--precision", "bf16"]  # fmt: skip
    trained = _megasft("train", *settings, "--save", str(tmp_path / "run"), "--train-iters", "2")
    assert trained.returncode == 0, trained.stderr[-4000:]
    measured = json.loads((tmp_path / "run" / "summary.json").read_text())["peak_memory_bytes"]
    planned = _megasft("plan", *settings, "--device-memory", "1000", "--json")
    assert planned.returncode == 0, planned.stderr
    parts = json.loads(planned.stdout)["parts"]
    predicted = parts["total"] - parts["allowance"]
    assert 0.8 < predicted / measured < 1.2, (predicted, measured, parts)
