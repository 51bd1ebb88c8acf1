"""The kernels of the torch attention for packed documents (megasft.megatron.torch_attention):
which one a device and torch get, and FlexAttention's document mask against SDPA run on each
document alone (compiled for the CPU here, as it is for a GPU there; FlexAttention has no
backward on the CPU, so its gradients and torch's varlen flash attention, GPU-only, are left
to tests/train/test_gpu.py and bench/gpu_check.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megasft.errors import ConfigError
from megasft.megatron import torch_attention
from megasft.megatron.torch_attention import PACKED_KERNEL_ENV, packed_kernel

LENGTHS = [5, 17, 9, 33, 8]


def _packed(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    cu_seqlens = torch.tensor([0, *LENGTHS]).cumsum(0).to(torch.int32)
    params = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max(LENGTHS), max_seqlen_kv=max(LENGTHS),
    )  # fmt: skip
    # [t, heads, d] queries, [t, groups, d] keys and values: 4 heads in 2 groups
    tensors = [torch.randn(total, heads, 16, generator=generator) for heads in (4, 2, 2)]
    return tensors, params


@pytest.mark.slow
@pytest.mark.parametrize("window", [None, 6])
def test_flex_attention_with_the_document_mask_equals_sdpa_per_document(window):
    (query, key, value), params = _packed()
    expected = torch_attention._sdpa_per_document(query, key, value, params, 0.25, window)
    output = torch_attention._flex(query, key, value, params, 0.25, window)  # [t, heads, d]
    assert output.shape == expected.shape == (sum(LENGTHS), 4, 16)
    assert (output - expected).abs().max().item() < 1e-5


def _query(device: str, dtype=torch.bfloat16):
    return SimpleNamespace(device=SimpleNamespace(type=device), dtype=dtype)


def test_kernel_choice_follows_the_device_the_dtype_and_the_installed_torch(monkeypatch):
    monkeypatch.delenv(PACKED_KERNEL_ENV, raising=False)
    monkeypatch.setattr(torch_attention, "_flex_function", lambda: object())
    monkeypatch.setattr(torch.version, "hip", None)
    with_window = frozenset({"window_size", "enable_gqa"})
    monkeypatch.setattr(torch_attention, "_varlen_parameters", lambda: with_window)
    assert packed_kernel(_query("cpu")) == "sdpa"
    assert packed_kernel(_query("cuda")) == "varlen"
    assert packed_kernel(_query("cuda", torch.float32)) == "flex"  # flash kernels: 16-bit
    monkeypatch.setattr(torch.version, "hip", "7.0")
    assert packed_kernel(_query("cuda")) == "flex"  # ROCm: FlexAttention's Triton kernels first
    monkeypatch.setattr(torch.version, "hip", None)
    # the first releases of varlen_attn: is_causal, no window
    monkeypatch.setattr(torch_attention, "_varlen_parameters", lambda: frozenset({"is_causal"}))
    assert packed_kernel(_query("cuda")) == "varlen"
    assert packed_kernel(_query("cuda"), window=6) == "flex"
    monkeypatch.setattr(torch_attention, "_flex_function", lambda: None)
    monkeypatch.setattr(torch_attention, "_varlen_parameters", lambda: frozenset())
    assert packed_kernel(_query("cuda")) == "sdpa"
    monkeypatch.setenv(PACKED_KERNEL_ENV, "flex")
    assert packed_kernel(_query("cpu")) == "flex"
    monkeypatch.setenv(PACKED_KERNEL_ENV, "fast")
    with pytest.raises(ConfigError, match="choose one of varlen, flex, sdpa"):
        packed_kernel(_query("cuda"))


def test_varlen_keywords_match_the_installed_signature(monkeypatch):
    monkeypatch.setattr(
        torch_attention, "_varlen_parameters", lambda: frozenset({"window_size", "enable_gqa"})
    )
    assert torch_attention._varlen_keywords(None) == {"window_size": (-1, 0), "enable_gqa": True}
    assert torch_attention._varlen_keywords(7)["window_size"] == (7, 0)
    monkeypatch.setattr(torch_attention, "_varlen_parameters", lambda: frozenset({"is_causal"}))
    assert torch_attention._varlen_keywords(None) == {"is_causal": True}
    assert torch_attention._varlen_keywords(7) is None


@pytest.mark.slow
def test_each_micro_batch_gets_its_own_flex_mask():
    """Two micro-batches with other document boundaries in turn: the second must not reuse the
    first's mask (a new PackedSeqParams per micro-batch, whatever memory it reuses)."""
    (query, key, value), params = _packed()
    torch_attention._flex(query, key, value, params, 0.25, None)
    other = torch.tensor([0, 30, 40, 72], dtype=torch.int32)
    moved = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=other, cu_seqlens_kv=other, max_seqlen_q=32,
        max_seqlen_kv=32,
    )  # fmt: skip
    expected = torch_attention._sdpa_per_document(query, key, value, moved, 0.25, None)
    output = torch_attention._flex(query, key, value, moved, 0.25, None)
    assert (output - expected).abs().max().item() < 1e-5
