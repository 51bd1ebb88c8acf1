"""Qwen3 (`Qwen3ForCausalLM`): Llama with RMSNorm over each query and key head (`q_norm`,
`k_norm`), and a `head_dim` independent of `hidden_size`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from megasft.megatron.families.base import ModelFamily
from megasft.megatron.families.qwen2 import refuse_sliding_window_layers
from megasft.megatron.families.registry import register
from megasft.megatron.families.weight_mapping import (
    HF_LAYER,
    MEGATRON_LAYER,
    Rename,
    TensorMapping,
)
from megasft.megatron.hf_config import ConfigReader

if TYPE_CHECKING:
    from megasft.megatron.architecture import ModelArchitecture

QK_NORMS = (
    Rename(
        f"{MEGATRON_LAYER}.self_attention.q_layernorm.weight",
        f"{HF_LAYER}.self_attn.q_norm.weight",
    ),
    Rename(
        f"{MEGATRON_LAYER}.self_attention.k_layernorm.weight",
        f"{HF_LAYER}.self_attn.k_norm.weight",
    ),
)


@register
class Qwen3(ModelFamily):
    model_type = "qwen3"
    hf_architecture_class = "Qwen3ForCausalLM"

    def check_attention_layers(self, config: ConfigReader) -> None:
        refuse_sliding_window_layers(config, self.model_type)
        super().check_attention_layers(config)

    def architecture_fields(self, config: ConfigReader) -> dict[str, Any]:
        return super().architecture_fields(config) | {"qk_layernorm": True}

    def weight_mappings(self, architecture: ModelArchitecture) -> tuple[TensorMapping, ...]:
        return (*super().weight_mappings(architecture), *QK_NORMS)
