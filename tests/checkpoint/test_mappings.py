"""The fused-tensor helpers produce megatron-core's layouts, and the tables cover each family."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megasft.checkpoint import mappings
from megasft.megatron.architecture import architecture_from_hf_config
from tests.checkpoint.tiny_models import TINY_MODELS


def architecture(name):
    config = TINY_MODELS[name].build().config.to_dict()
    return architecture_from_hf_config(config)


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
    fused = mappings.fuse_qkv(q, k, v, arch)
    expected_heads = [(1, 0), (1, 1), (2, 0), (3, 0), (1, 2), (1, 3), (2, 1), (3, 1)]
    expected = [
        prefix * 100 + head * 10 + channel
        for prefix, head in expected_heads
        for channel in range(2)
    ]
    assert fused[:, 0].tolist() == expected
    assert all(
        torch.equal(a, b) for a, b in zip(mappings.split_qkv(fused, arch), (q, k, v), strict=True)
    )


def test_qkv_bias_fuses_like_the_weight():
    arch = architecture("qwen2")
    q = torch.randn(arch.num_attention_heads * arch.head_dim, 64)
    k = torch.randn(arch.num_query_groups * arch.head_dim, 64)
    v = torch.randn_like(k)
    fused_weight = mappings.fuse_qkv(q, k, v, arch)
    fused_bias = mappings.fuse_qkv(q[:, 0], k[:, 0], v[:, 0], arch)
    assert torch.equal(fused_bias, fused_weight[:, 0])


def test_gate_rows_come_first_in_fc1():
    arch = architecture("llama")
    assert mappings.gate_up_rows(arch) == (slice(0, 128), slice(128, 256))
    (fc1,) = [mapping for mapping in mappings.LLAMA if isinstance(mapping, mappings.FusedGateUp)]
    assert mappings.megatron_shape(fc1, arch) == (256, 64)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_table_covers_every_hf_tensor_of_the_family(name):
    model = TINY_MODELS[name].build()
    arch = architecture_from_hf_config(model.config.to_dict())
    hf_names = {
        hf_name.format(layer=layer)
        for mapping in mappings.mappings_for(arch)
        for layer in range(arch.num_layers)
        for hf_name in mapping.hf_names
    }
    state_dict = model.state_dict()
    if arch.tied_embeddings:
        state_dict.pop("lm_head.weight")  # the same tensor as the embedding
    assert hf_names == set(state_dict)


def test_stacked_key_drops_the_layer_number():
    assert (
        mappings.stacked_key("decoder.layers.{layer}.mlp.linear_fc2.weight")
        == "decoder.layers.mlp.linear_fc2.weight"
    )
