"""Llama 2 and 3.x (`LlamaForCausalLM`): the decoder of `ModelFamily` as it is, including
Llama 3.1's RoPE scaling (`rope_type: llama3`) and tied embeddings (Llama 3.2)."""

from __future__ import annotations

from megasft.megatron.families.base import ModelFamily
from megasft.megatron.families.registry import register


@register
class Llama(ModelFamily):
    model_type = "llama"
    hf_architecture_class = "LlamaForCausalLM"
