"""Mixtral (`MixtralForCausalLM`, e.g. Mixtral-8x7B): Mistral's attention (with its optional
`sliding_window`) and an MoE block on every layer: `num_local_experts` experts, each
`intermediate_size` wide, `num_experts_per_tok` of them per token, the top-k softmax weights
always renormalised. No shared expert."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from megasft.errors import ConfigError
from megasft.megatron.families.mistral import read_sliding_window
from megasft.megatron.families.moe import (
    EXPERTS_FC1,
    EXPERTS_FC2,
    PRE_MLP_NORM,
    ROUTER,
    MoEFamily,
)
from megasft.megatron.families.registry import register
from megasft.megatron.families.weight_mapping import (
    HF_LAYER,
    ExpertsGateUp,
    ExpertsRename,
    Rename,
)
from megasft.megatron.hf_config import ConfigReader, MoEArchitecture

if TYPE_CHECKING:
    from megasft.megatron.architecture import ModelArchitecture

HF_BLOCK = f"{HF_LAYER}.block_sparse_moe"
HF_EXPERT = f"{HF_BLOCK}.experts.{{expert}}"


@register
class Mixtral(MoEFamily):
    model_type = "mixtral"
    hf_architecture_class = "MixtralForCausalLM"
    moe_block = (
        Rename(PRE_MLP_NORM, f"{HF_LAYER}.post_attention_layernorm.weight"),
        Rename(ROUTER, f"{HF_BLOCK}.gate.weight"),
        # w1 is the gated projection, w3 the up projection, w2 the down projection.
        ExpertsGateUp(EXPERTS_FC1, gate=f"{HF_EXPERT}.w1.weight", up=f"{HF_EXPERT}.w3.weight"),
        ExpertsRename(EXPERTS_FC2, f"{HF_EXPERT}.w2.weight"),
    )

    def check_config(self, config: ConfigReader) -> None:
        super().check_config(config)
        if config.get("router_jitter_noise", float, default=0.0) != 0.0:
            raise ConfigError(
                f"{config.source}: router_jitter_noise is not 0; transformers scales the MoE "
                "block's input by random noise in training, which megatron-core does not "
                "reproduce (its moe_input_jitter_eps reaches the router only)"
            )

    def architecture_fields(self, config: ConfigReader) -> dict[str, Any]:
        fields = super().architecture_fields(config)
        window = read_sliding_window(config, fields["max_position_embeddings"])
        return fields | {"sliding_window": window}

    def read_moe(self, config: ConfigReader, num_layers: int) -> MoEArchitecture:
        return MoEArchitecture(
            num_experts=config.get("num_local_experts", int),
            router_topk=config.get("num_experts_per_tok", int),
            expert_ffn_hidden_size=config.get("intermediate_size", int),
            normalize_topk=True,
            moe_layers=tuple(range(num_layers)),
            aux_loss_coeff=config.get("router_aux_loss_coef", float, default=0.001),
        )

    def hf_config_fields(self, architecture: ModelArchitecture) -> dict[str, Any]:
        moe = architecture.moe
        return {
            "sliding_window": architecture.sliding_window,
            "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.router_topk,
            "router_aux_loss_coef": moe.aux_loss_coeff,
        }
