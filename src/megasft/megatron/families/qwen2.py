"""Qwen2 and Qwen2.5 (`Qwen2ForCausalLM`): Llama with biases on the q, k and v projections."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from megasft.errors import ConfigError
from megasft.megatron.families.base import ModelFamily
from megasft.megatron.families.registry import register
from megasft.megatron.families.weight_mapping import (
    HF_LAYER,
    MEGATRON_LAYER,
    FusedQKV,
    TensorMapping,
)
from megasft.megatron.hf_config import ConfigReader

if TYPE_CHECKING:
    from megasft.megatron.architecture import ModelArchitecture

QKV_BIAS = FusedQKV(
    f"{MEGATRON_LAYER}.self_attention.linear_qkv.bias",
    q=f"{HF_LAYER}.self_attn.q_proj.bias",
    k=f"{HF_LAYER}.self_attn.k_proj.bias",
    v=f"{HF_LAYER}.self_attn.v_proj.bias",
)


def refuse_sliding_window_layers(config: ConfigReader, model_type: str) -> None:
    """Refuse Qwen's sliding-window layers (`use_sliding_window`, on the layers from
    `max_window_layers` on), which megasft does not build; Qwen3 configs have them too.

    Raises:
        ConfigError: `use_sliding_window` is true.
    """
    if config.get("use_sliding_window", bool, default=False):
        raise ConfigError(
            f"{config.source}: use_sliding_window is true; sliding-window layers of "
            f"{model_type} (max_window_layers) are not supported"
        )


@register
class Qwen2(ModelFamily):
    model_type = "qwen2"
    hf_architecture_class = "Qwen2ForCausalLM"

    def check_projection_biases(self, config: ConfigReader) -> None:
        # Qwen2's q, k and v always have biases (qkv_bias); its config has no bias fields.
        pass

    def check_attention_layers(self, config: ConfigReader) -> None:
        refuse_sliding_window_layers(config, self.model_type)
        super().check_attention_layers(config)

    def architecture_fields(self, config: ConfigReader) -> dict[str, Any]:
        return super().architecture_fields(config) | {"qkv_bias": True}

    def hf_config_fields(self, architecture: ModelArchitecture) -> dict[str, Any]:
        return {}  # Qwen2Config has no attention_bias

    def weight_mappings(self, architecture: ModelArchitecture) -> tuple[TensorMapping, ...]:
        return (*super().weight_mappings(architecture), QKV_BIAS)
