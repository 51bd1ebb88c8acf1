"""The fused-tensor layouts are megatron-core's, and the tables cover each family."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megasft.checkpoint import mappings
from megasft.megatron.architecture import ModelArchitecture, architecture_from_hf_config
from megasft.megatron.families.weight_mapping import DECODER, FusedGateUp
from tests.checkpoint.tiny_models import TINY_MODELS, read_hf_weights


def architecture(name):
    config = TINY_MODELS[name].build().config.to_dict()
    return architecture_from_hf_config(config)


def fuse_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, architecture: ModelArchitecture
) -> torch.Tensor:
    """HF q [heads*d, ...], k and v [groups*d, ...] -> megatron linear_qkv
    [(heads+2*groups)*d, ...], the `qkv_blocks` layout applied to tensors."""
    parts = (q, k, v)
    fused = q.new_empty((q.shape[0] + k.shape[0] + v.shape[0], *q.shape[1:]))
    for block in mappings.qkv_blocks(architecture):
        source = parts[block.part][block.hf_first_row : block.hf_first_row + block.rows]
        fused[block.fused_first_row : block.fused_first_row + block.rows] = source
    return fused


def split_qkv(
    qkv: torch.Tensor, architecture: ModelArchitecture
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `fuse_qkv`: megatron linear_qkv -> HF (q, k, v)."""
    query_rows = architecture.num_attention_heads * architecture.head_dim
    kv_rows = architecture.num_query_groups * architecture.head_dim
    trailing = qkv.shape[1:]
    parts = tuple(qkv.new_empty((rows, *trailing)) for rows in (query_rows, kv_rows, kv_rows))
    for block in mappings.qkv_blocks(architecture):
        target = parts[block.part][block.hf_first_row : block.hf_first_row + block.rows]
        target[...] = qkv[block.fused_first_row : block.fused_first_row + block.rows]
    q, k, v = parts
    return q, k, v


def labelled_rows(prefix: int, heads: int, head_dim: int) -> torch.Tensor:
    """[heads * head_dim, 1] rows labelled prefix*100 + head*10 + channel."""
    return torch.tensor(
        [
            [prefix * 100 + head * 10 + channel]
            for head in range(heads)
            for channel in range(head_dim)
        ],
        dtype=torch.float32,
    )


def test_qkv_is_interleaved_per_query_group():
    # 4 query heads in 2 groups, head_dim 2: [q0 q1 k0 v0 | q2 q3 k1 v1]
    arch = dataclasses.replace(
        architecture("llama"), num_attention_heads=4, num_query_groups=2, head_dim=2
    )
    q, k, v = labelled_rows(1, 4, 2), labelled_rows(2, 2, 2), labelled_rows(3, 2, 2)
    fused = fuse_qkv(q, k, v, arch)
    expected_heads = [(1, 0), (1, 1), (2, 0), (3, 0), (1, 2), (1, 3), (2, 1), (3, 1)]
    expected = [
        prefix * 100 + head * 10 + channel
        for prefix, head in expected_heads
        for channel in range(2)
    ]
    assert fused[:, 0].tolist() == expected
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, arch), (q, k, v), strict=True))


def test_qkv_bias_fuses_like_the_weight():
    arch = architecture("qwen2")
    q = torch.randn(arch.num_attention_heads * arch.head_dim, 64)
    k = torch.randn(arch.num_query_groups * arch.head_dim, 64)
    v = torch.randn_like(k)
    fused_weight = fuse_qkv(q, k, v, arch)
    fused_bias = fuse_qkv(q[:, 0], k[:, 0], v[:, 0], arch)
    assert torch.equal(fused_bias, fused_weight[:, 0])


def test_gate_rows_come_first_in_fc1():
    arch = architecture("llama")
    assert mappings.gate_up_rows(arch) == (slice(0, 128), slice(128, 256))
    (fc1,) = [mapping for mapping in DECODER if isinstance(mapping, FusedGateUp)]
    assert mappings.megatron_shape(fc1, arch) == (256, 64)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_table_covers_every_hf_tensor_of_the_family(name, hf_model_dirs):
    # The saved files, not the model's state dict: transformers 5 keeps the experts of an MoE
    # layer as one 3-D parameter in memory but saves one tensor per expert, as on the Hub.
    saved = read_hf_weights(hf_model_dirs[name])
    arch = architecture_from_hf_config(TINY_MODELS[name].build().config.to_dict())
    hf_names = {
        mappings.hf_name(hf_name, layer, expert)
        for mapping in mappings.mappings_for(arch)
        for layer in mappings.layers_of(mapping, arch)
        for expert in mappings.experts_of(mapping, arch)
        for hf_name in mapping.hf_names
    }
    if arch.tied_embeddings:
        saved.pop("lm_head.weight", None)  # the same tensor as the embedding
    assert hf_names == set(saved)


def test_stacked_key_drops_the_layer_number():
    assert (
        mappings.stacked_key("decoder.layers.{layer}.mlp.linear_fc2.weight")
        == "decoder.layers.mlp.linear_fc2.weight"
    )
