"""The torch core attention (`megasft.megatron.torch_attention`) computes what megatron-core's
local attention and transformers compute, in fp32 on CPU: the same logits for every family at
TP=1 and TP=2, and on packed documents (rows with a block-diagonal mask, or one THD sequence
with cu_seqlens) the logits and gradients of each document run on its own.

megatron-core runs in megatron_worker.py (see conftest.py); these tests compare its outputs.
"""

from __future__ import annotations

import pytest
import torch

from megasft.errors import ConfigError
from megasft.megatron.attention import choose_attention
from tests.checkpoint.tiny_models import TINY_MODELS

FAMILIES = sorted(TINY_MODELS)
TOLERANCE = 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("tensor_parallel", [1, 2])
@pytest.mark.parametrize("name", FAMILIES)
def test_torch_attention_gives_the_local_attentions_logits(worker_runs, name, tensor_parallel):
    local = torch.load(worker_runs / f"logits_tp{tensor_parallel}_{name}.pt")
    ours = torch.load(worker_runs / f"logits_tp{tensor_parallel}_torch_{name}.pt")
    assert ours.shape == local.shape
    assert (ours - local).abs().max().item() <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["rows_torch", "thd_torch"])
@pytest.mark.parametrize("name", FAMILIES)
def test_packed_documents_equal_each_document_alone(worker_runs, name, layout):
    result = torch.load(worker_runs / f"packed_documents_{name}.pt")
    reference, packed = result["one_by_one_local"], result[layout]
    assert sorted(packed["logits"]) == sorted(reference["logits"])
    for document, logits in reference["logits"].items():
        assert (packed["logits"][document] - logits).abs().max().item() <= TOLERANCE, document
    assert sorted(packed["gradients"]) == sorted(reference["gradients"])
    for name_, gradient in reference["gradients"].items():
        difference = (packed["gradients"][name_] - gradient).norm().item()
        assert difference <= TOLERANCE * gradient.norm().item(), name_


# --- which attention a run gets ------------------------------------------------------------------


def test_auto_takes_transformer_engine_for_bf16_on_a_gpu_and_torch_elsewhere():
    def plan(precision, on_accelerator, transformer_engine):
        return choose_attention(
            "auto",
            precision=precision,
            on_accelerator=on_accelerator,
            transformer_engine=transformer_engine,
        )

    assert plan("bf16", True, True).backend == "te"
    assert plan("bf16", True, True).packed
    # fp32 on a GPU with Transformer Engine: its layers, the torch attention, packed rows
    fp32 = plan("fp32", True, True)
    assert (fp32.backend, fp32.packed, fp32.transformer_engine_layers) == ("torch", True, True)
    assert plan("bf16", True, False).backend == "torch"
    cpu = plan("bf16", False, True)
    assert (cpu.backend, cpu.packed, cpu.transformer_engine_layers) == ("torch", False, False)


def test_te_attention_is_refused_for_fp32_and_without_a_gpu_naming_the_fix():
    with pytest.raises(ConfigError, match="no attention kernel for fp32.*--precision bf16"):
        choose_attention("te", precision="fp32", on_accelerator=True, transformer_engine=True)
    with pytest.raises(ConfigError, match="has no GPU"):
        choose_attention("te", precision="bf16", on_accelerator=False, transformer_engine=True)
    with pytest.raises(ConfigError, match="Transformer Engine is not installed"):
        choose_attention("te", precision="bf16", on_accelerator=True, transformer_engine=False)


# --- attention dropout ---------------------------------------------------------------------------


def test_attention_dropout_on_rows_draws_from_the_default_generator():
    from megasft.megatron.torch_attention import rows_attention

    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(16, 2, 4, 8, generator=generator) for _ in range(3))

    def attend(dropout: float) -> torch.Tensor:
        torch.manual_seed(1)
        return rows_attention(query, key, value, None, 8**-0.5, None, dropout)

    plain = attend(0.0)
    dropped = attend(0.5)
    assert dropped.shape == plain.shape == (16, 2, 32)
    assert not torch.allclose(dropped, plain)
    assert torch.equal(attend(0.5), dropped)  # the same draws from the same seed


def test_attention_dropout_with_the_torch_attention_on_packed_documents_is_refused():
    from megasft.megatron.attention import AttentionPlan
    from megasft.train.checks import _check_device_features
    from megasft.train.config import TrainConfig

    config = TrainConfig(data=".", load=".", save=".", train_iters=1, attention_dropout=0.1)
    packed = AttentionPlan(backend="torch", packed=True, transformer_engine_layers=True)
    with pytest.raises(ConfigError, match="--attention-dropout 0.1: the torch attention has none"):
        _check_device_features(config, packed, on_accelerator=False)
    rows = AttentionPlan(backend="torch", packed=False, transformer_engine_layers=False)
    _check_device_features(config, rows, on_accelerator=False)  # rows (CPU) have it
