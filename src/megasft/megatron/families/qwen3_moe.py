"""Qwen3-MoE (`Qwen3MoeForCausalLM`, e.g. Qwen3-30B-A3B): Qwen3's attention (QK norm, its own
`head_dim`) with MoE blocks of `num_experts` experts, `num_experts_per_tok` of them per token,
each `moe_intermediate_size` wide, on the layers `decoder_sparse_step` and `mlp_only_layers`
choose (the others keep a dense MLP of `intermediate_size`); the top-k weights are
renormalised when `norm_topk_prob`. No shared expert."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from megasft.errors import ConfigError
from megasft.megatron.families.moe import (
    EXPERTS_FC1,
    EXPERTS_FC2,
    PRE_MLP_NORM,
    ROUTER,
    MoEFamily,
)
from megasft.megatron.families.qwen2 import refuse_sliding_window_layers
from megasft.megatron.families.qwen3 import QK_NORMS
from megasft.megatron.families.registry import register
from megasft.megatron.families.weight_mapping import (
    HF_LAYER,
    ExpertsGateUp,
    ExpertsRename,
    Rename,
    TensorMapping,
)
from megasft.megatron.hf_config import ConfigReader, MoEArchitecture

if TYPE_CHECKING:
    from megasft.megatron.architecture import ModelArchitecture

HF_EXPERT = f"{HF_LAYER}.mlp.experts.{{expert}}"


@register
class Qwen3Moe(MoEFamily):
    model_type = "qwen3_moe"
    hf_architecture_class = "Qwen3MoeForCausalLM"
    moe_block = (
        Rename(PRE_MLP_NORM, f"{HF_LAYER}.post_attention_layernorm.weight"),
        Rename(ROUTER, f"{HF_LAYER}.mlp.gate.weight"),
        ExpertsGateUp(
            EXPERTS_FC1, gate=f"{HF_EXPERT}.gate_proj.weight", up=f"{HF_EXPERT}.up_proj.weight"
        ),
        ExpertsRename(EXPERTS_FC2, f"{HF_EXPERT}.down_proj.weight"),
    )

    def check_attention_layers(self, config: ConfigReader) -> None:
        refuse_sliding_window_layers(config, self.model_type)
        super().check_attention_layers(config)

    def architecture_fields(self, config: ConfigReader) -> dict[str, Any]:
        return super().architecture_fields(config) | {"qk_layernorm": True}

    def read_moe(self, config: ConfigReader, num_layers: int) -> MoEArchitecture:
        # The Hub's configs write num_experts; transformers 5 saves it as num_local_experts.
        experts = config.get("num_experts", int, default=None)
        if experts is None:
            experts = config.get("num_local_experts", int)
        step = config.get("decoder_sparse_step", int, default=1)
        dense_layers = config.config.get("mlp_only_layers") or []
        if step < 1 or not all(isinstance(layer, int) for layer in dense_layers):
            raise ConfigError(
                f"{config.source}: decoder_sparse_step must be a positive int and "
                "mlp_only_layers a list of layer numbers"
            )
        return MoEArchitecture(
            num_experts=experts,
            router_topk=config.get("num_experts_per_tok", int),
            expert_ffn_hidden_size=config.get("moe_intermediate_size", int),
            normalize_topk=config.get("norm_topk_prob", bool, default=False),
            moe_layers=tuple(
                layer
                for layer in range(num_layers)
                if layer not in dense_layers and (layer + 1) % step == 0
            ),
            aux_loss_coeff=config.get("router_aux_loss_coef", float, default=0.001),
        )

    def hf_config_fields(self, architecture: ModelArchitecture) -> dict[str, Any]:
        moe = architecture.moe
        return {
            "attention_bias": False,
            "num_experts": moe.num_experts,
            "num_experts_per_tok": moe.router_topk,
            "moe_intermediate_size": moe.expert_ffn_hidden_size,
            "norm_topk_prob": moe.normalize_topk,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [
                layer for layer in range(architecture.num_layers) if layer not in moe.moe_layers
            ],
            "router_aux_loss_coef": moe.aux_loss_coeff,
        }

    def weight_mappings(self, architecture: ModelArchitecture) -> tuple[TensorMapping, ...]:
        return (*super().weight_mappings(architecture), *QK_NORMS)
