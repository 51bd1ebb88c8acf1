"""Mistral (`MistralForCausalLM`): Llama with sliding-window attention (`sliding_window`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from megasft.megatron.families.base import ModelFamily
from megasft.megatron.families.registry import register
from megasft.megatron.hf_config import ConfigReader

if TYPE_CHECKING:
    from megasft.megatron.architecture import ModelArchitecture


def read_sliding_window(config: ConfigReader, max_position_embeddings: int) -> int | None:
    """Mistral's `sliding_window` (Mixtral's too): None when absent or when it covers every
    position, since such a window changes nothing.

    Raises:
        ConfigError: the field is not an int.
    """
    window = config.get("sliding_window", int, default=None)
    if window is not None and window >= max_position_embeddings:
        return None
    return window


@register
class Mistral(ModelFamily):
    model_type = "mistral"
    hf_architecture_class = "MistralForCausalLM"

    def architecture_fields(self, config: ConfigReader) -> dict[str, Any]:
        fields = super().architecture_fields(config)
        window = read_sliding_window(config, fields["max_position_embeddings"])
        return fields | {"sliding_window": window}

    def hf_config_fields(self, architecture: ModelArchitecture) -> dict[str, Any]:
        # MistralConfig has no attention_bias.
        return {"sliding_window": architecture.sliding_window}
