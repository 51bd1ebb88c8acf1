"""Reading the architecture from config.json: every family, both RoPE config styles, and
refusals that name the field."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from megasft.errors import ConfigError
from megasft.megatron.architecture import (
    Llama3RopeScaling,
    ModelArchitecture,
    MoEArchitecture,
    architecture_from_hf_config,
    hf_config_from_architecture,
    padded_vocab_size,
)
from megasft.megatron.rope import llama3_inverse_frequencies
from tests.checkpoint.tiny_models import TINY_MODELS

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def config_of(name: str) -> dict:
    return TINY_MODELS[name].build().config.to_dict()


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_every_tiny_model_reads_and_round_trips_through_json(name):
    architecture = architecture_from_hf_config(config_of(name))
    assert ModelArchitecture.from_json(architecture.to_json()) == architecture
    assert architecture_from_hf_config(hf_config_from_architecture(architecture)) == architecture


def test_family_specific_fields():
    qwen2 = architecture_from_hf_config(config_of("qwen2"))
    qwen3 = architecture_from_hf_config(config_of("qwen3"))
    mistral = architecture_from_hf_config(config_of("mistral"))
    tied = architecture_from_hf_config(config_of("llama_tied"))
    assert (qwen2.qkv_bias, qwen2.qk_layernorm) == (True, False)
    assert (qwen3.qkv_bias, qwen3.qk_layernorm, qwen3.head_dim) == (False, True, 32)
    assert mistral.sliding_window == 8
    assert tied.tied_embeddings
    assert qwen2.num_query_groups == 2 and qwen2.num_attention_heads == 4


def test_legacy_rope_fields_are_read():
    # config.json written by transformers 4.x: rope_theta and rope_scaling at the top level.
    config = config_of("llama")
    config.pop("rope_parameters", None)
    config.update(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)
    architecture = architecture_from_hf_config(config)
    assert architecture.rope_theta == 500000.0
    assert architecture.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 8192)


def test_llama3_frequencies_equal_transformers():
    config = LlamaConfig(
        hidden_size=2048,
        num_attention_heads=16,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_SCALING,
        max_position_embeddings=131072,
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    actual = llama3_inverse_frequencies(128, 500000.0, Llama3RopeScaling(8.0, 1.0, 4.0, 8192))
    assert torch.equal(actual, expected)
    # All three bands occur, so the comparison covers each branch.
    wavelengths = 2 * math.pi / (1.0 / 500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    assert (wavelengths < 2048).any() and (wavelengths > 8192).any()
    assert ((wavelengths >= 2048) & (wavelengths <= 8192)).any()


def test_vocab_padding_is_tp_agnostic():
    assert padded_vocab_size(100) == 128
    assert padded_vocab_size(128) == 128
    assert padded_vocab_size(151936) % 128 == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "architectures is"),
        ({"hidden_act": "gelu"}, "hidden_act must be 'silu'"),
        ({"attention_bias": True}, "attention_bias is true"),
        ({"mlp_bias": True}, "mlp_bias is true"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
            r"rope_parameters.rope_type 'yarn'",
        ),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "needs 'low_freq_factor'"),
        ({"num_hidden_layers": None}, "required field 'num_hidden_layers' is missing"),
        ({"hidden_size": "64"}, "field 'hidden_size' must be int"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_unsupported_configs_name_the_field(changes, message):
    config = config_of("llama") | changes
    with pytest.raises(ConfigError, match=message):
        architecture_from_hf_config(config)


def test_qwen_sliding_window_layers_are_refused():
    config = config_of("qwen2") | {"use_sliding_window": True, "sliding_window": 16}
    with pytest.raises(ConfigError, match="use_sliding_window is true"):
        architecture_from_hf_config(config)


def test_mistral_window_covering_every_position_is_no_window():
    config = config_of("mistral") | {"sliding_window": 4096, "max_position_embeddings": 4096}
    assert architecture_from_hf_config(config).sliding_window is None


# --- mixture of experts ------------------------------------------------------------------------


def test_moe_fields_of_each_moe_family():
    qwen3_moe = architecture_from_hf_config(config_of("qwen3_moe"))
    assert qwen3_moe.moe == MoEArchitecture(
        num_experts=4,
        router_topk=2,
        expert_ffn_hidden_size=32,
        normalize_topk=True,
        moe_layers=(0, 1),
        aux_loss_coeff=0.001,
    )
    assert (qwen3_moe.qk_layernorm, qwen3_moe.stacked_layers) == (True, True)
    mixed = architecture_from_hf_config(config_of("qwen3_moe_dense"))
    assert (mixed.moe.moe_layers, mixed.moe.normalize_topk, mixed.stacked_layers) == (
        (1,),
        False,
        False,
    )
    assert (mixed.is_moe_layer(0), mixed.is_moe_layer(1)) == (False, True)
    mixtral = architecture_from_hf_config(config_of("mixtral"))
    assert mixtral.moe.expert_ffn_hidden_size == mixtral.ffn_hidden_size == 128
    assert (mixtral.moe.normalize_topk, mixtral.moe.moe_layers, mixtral.sliding_window) == (
        True,
        (0, 1),
        16,
    )
    assert architecture_from_hf_config(config_of("llama")).moe is None


def test_qwen3_moe_hub_config_and_sparse_step():
    # The Hub's Qwen3-MoE configs name the expert count num_experts; transformers 5 writes
    # num_local_experts. decoder_sparse_step 2 puts the MoE block on every second layer.
    config = config_of("qwen3_moe")
    config["num_experts"] = config.pop("num_local_experts")
    config |= {"num_hidden_layers": 4, "decoder_sparse_step": 2, "router_aux_loss_coef": 0.02}
    architecture = architecture_from_hf_config(config)
    assert (architecture.moe.num_experts, architecture.moe.moe_layers) == (4, (1, 3))
    assert architecture.moe.aux_loss_coeff == 0.02
    assert architecture_from_hf_config(hf_config_from_architecture(architecture)) == architecture


def test_architecture_json_without_moe_still_loads():
    # Files written before MoE support have no "moe" field.
    architecture = architecture_from_hf_config(config_of("llama"))
    fields = json.loads(architecture.to_json())
    del fields["moe"]
    assert ModelArchitecture.from_json(json.dumps(fields)) == architecture


@pytest.mark.parametrize(
    ("name", "changes", "message"),
    [
        ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise is not 0"),
        ("mixtral", {"num_experts_per_tok": 5}, r"num_experts_per_tok \(5\) must be between"),
        ("qwen3_moe", {"mlp_only_layers": [0, 1]}, "no MoE layer"),
        ("qwen3_moe", {"moe_intermediate_size": None}, "'moe_intermediate_size' is missing"),
        ("qwen3_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step must be a positive"),
    ],
)
def test_unsupported_moe_configs_name_the_field(name, changes, message):
    with pytest.raises(ConfigError, match=message):
        architecture_from_hf_config(config_of(name) | changes)


@pytest.mark.parametrize(
    ("name", "sizes", "message"),
    [
        ("mixtral", {"expert_parallel_size": 3}, "expert parallel size 3 does not divide the 4"),
        (
            "qwen3_moe",
            {"expert_tensor_parallel_size": 3},
            r"expert tensor parallel size 3 does not divide the experts' intermediate size \(32\)",
        ),
        ("llama", {"expert_parallel_size": 2}, "needs a mixture-of-experts model; llama is dense"),
    ],
)
def test_expert_parallel_sizes_must_fit_the_model(name, sizes, message):
    from megasft.megatron.builder import transformer_config

    architecture = architecture_from_hf_config(config_of(name))
    with pytest.raises(ConfigError, match=message):
        transformer_config(architecture, **sizes)
