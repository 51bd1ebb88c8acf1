"""`MoEFamily`: what a mixture-of-experts decoder adds to `ModelFamily` (Mixtral, Qwen3-MoE).

Some or all layers replace the dense MLP by an MoE block: a router (one logit per expert from
a linear layer, softmax, top-k) and routed experts, each a SwiGLU MLP; no shared expert. A
family module subclasses this (it registers nothing itself), reads its config fields into
`MoEArchitecture` and names its HF tensors in `moe_block`. megatron-core builds the block as
its `MoELayer` with `HFTopKRouter`: sequential experts with the local layers (CPU), grouped
GEMM experts with Transformer Engine; both save the same checkpoint keys. See docs/convert.md
("Mixture of experts").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, ClassVar

from megasft.megatron.families.base import ModelFamily
from megasft.megatron.families.weight_mapping import DENSE_MLP, MEGATRON_LAYER, TensorMapping
from megasft.megatron.hf_config import ConfigReader, MoEArchitecture

if TYPE_CHECKING:
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megasft.megatron.architecture import ModelArchitecture

# megatron-core's checkpoint keys of an MoE layer's norm, router and experts. Each experts
# tensor is one key with the expert as the leading axis, whichever expert layout saved it
# (sequential, grouped GEMM); "experts.experts." is the MoE layer's `experts` module, then the
# prefix every expert layout gives its weights.
PRE_MLP_NORM = f"{MEGATRON_LAYER}.pre_mlp_layernorm.weight"
ROUTER = f"{MEGATRON_LAYER}.mlp.router.weight"
EXPERTS_FC1 = f"{MEGATRON_LAYER}.mlp.experts.experts.linear_fc1.weight"
EXPERTS_FC2 = f"{MEGATRON_LAYER}.mlp.experts.experts.linear_fc2.weight"


class MoEFamily(ModelFamily):
    """A decoder with mixture-of-experts MLPs (`ModelArchitecture.moe`)."""

    moe_block: ClassVar[tuple[TensorMapping, ...]]
    """The weight table of one MoE layer: `PRE_MLP_NORM`, `ROUTER`, `EXPERTS_FC1` and
    `EXPERTS_FC2` from the family's HF names."""

    def read_moe(self, config: ConfigReader, num_layers: int) -> MoEArchitecture:
        """The MoE blocks of a checked config.

        Args:
            config: the family's config.json.
            num_layers: the model's layer count.

        Returns:
            The MoE architecture.

        Raises:
            ConfigError: a field missing or of the wrong type.
        """
        raise NotImplementedError

    def architecture_fields(self, config: ConfigReader) -> dict[str, Any]:
        fields = super().architecture_fields(config)
        return fields | {"moe": self.read_moe(config, fields["num_layers"])}

    def transformer_config_fields(self, architecture: ModelArchitecture) -> dict[str, Any]:
        moe = architecture.moe
        layer_pattern = [int(architecture.is_moe_layer(n)) for n in range(architecture.num_layers)]
        return super().transformer_config_fields(architecture) | dict(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.router_topk,
            moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
            # 1: every layer is MoE; a 0/1 list otherwise, which also makes megatron-core save
            # one key per layer (`ModelArchitecture.stacked_layers`).
            moe_layer_freq=1 if architecture.stacked_layers else layer_pattern,
            # transformers' order: softmax over all experts, then top-k (see HFTopKRouter).
            moe_router_pre_softmax=True,
            moe_router_score_function="softmax",
            # Router logits and softmax in fp32 whatever the model's dtype, for stable routing.
            moe_router_dtype="fp32",
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=moe.aux_loss_coeff,
            moe_token_dispatcher_type="alltoall",
            moe_expert_capacity_factor=None,  # dropless: every token reaches its k experts
        )

    def layer_spec(
        self,
        architecture: ModelArchitecture,
        config: TransformerConfig,
        *,
        transformer_engine: bool,
        vp_stage: int | None = None,
    ) -> ModuleSpec | TransformerBlockSubmodules:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_local_spec,
            get_gpt_layer_with_transformer_engine_spec,
        )
        from megatron.core.transformer.transformer_block import (
            LayerNormImpl,
            TransformerBlockSubmodules,
            get_num_layers_to_build,
        )
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        from megasft.megatron.compat import moe_layer_with_router
        from megasft.megatron.moe_router import HFTopKRouter
        from megasft.megatron.norms import SequenceParallelNorm, with_sequence_parallel_norms

        experts, qk_layernorm = architecture.moe.num_experts, architecture.qk_layernorm
        if transformer_engine:
            spec = get_gpt_layer_with_transformer_engine_spec(
                num_experts=experts, moe_grouped_gemm=True, qk_layernorm=qk_layernorm
            )
            keys_map = spec.submodules.sharded_state_dict_keys_map
        else:
            spec = get_gpt_layer_local_spec(
                num_experts=experts,
                qk_layernorm=qk_layernorm,
                normalization=self.normalization,
            )
            # The local spec would save an MoE layer's pre-MLP norm under the dense MLP's fused
            # name (`mlp.linear_fc1.layer_norm_weight`); Transformer Engine's MoE layer keeps
            # `pre_mlp_layernorm.weight`. Keep that one, so both specs save the same keys.
            keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
        router = functools.partial(HFTopKRouter, normalize_topk=architecture.moe.normalize_topk)
        mlp = moe_layer_with_router(spec.submodules.mlp, router)
        moe_spec = dataclasses.replace(
            spec,
            submodules=dataclasses.replace(
                spec.submodules, mlp=mlp, sharded_state_dict_keys_map=keys_map
            ),
        )
        if transformer_engine and architecture.stacked_layers:
            return moe_spec
        dense_spec = super().layer_spec(
            architecture, config, transformer_engine=transformer_engine, vp_stage=vp_stage
        )
        final_norm = LayerNormImpl
        if not transformer_engine:
            # MoE training with TP > 1 needs sequence parallelism, which the local norms
            # refuse (see megasft.megatron.norms).
            moe_spec, dense_spec = map(with_sequence_parallel_norms, (moe_spec, dense_spec))
            final_norm = SequenceParallelNorm
        specs = [
            moe_spec if architecture.is_moe_layer(layer) else dense_spec
            for layer in range(architecture.num_layers)
        ]
        first = get_transformer_layer_offset(config, vp_stage=vp_stage)
        count = get_num_layers_to_build(config, vp_stage=vp_stage)
        return TransformerBlockSubmodules(
            layer_specs=specs[first : first + count], layer_norm=final_norm
        )

    def weight_mappings(self, architecture: ModelArchitecture) -> tuple[TensorMapping, ...]:
        moe = architecture.moe
        table = tuple(m for m in super().weight_mappings(architecture) if m not in DENSE_MLP)
        if architecture.stacked_layers:
            return (*table, *self.moe_block)
        dense_layers = tuple(
            layer for layer in range(architecture.num_layers) if layer not in moe.moe_layers
        )
        return (
            *table,
            *(dataclasses.replace(mapping, layers=dense_layers) for mapping in DENSE_MLP),
            *(dataclasses.replace(mapping, layers=moe.moe_layers) for mapping in self.moe_block),
        )

    def megatron_shape(
        self, mapping: TensorMapping, architecture: ModelArchitecture
    ) -> tuple[int, ...]:
        hidden, moe = architecture.hidden_size, architecture.moe
        experts, ffn = moe.num_experts, moe.expert_ffn_hidden_size
        shapes = {
            PRE_MLP_NORM: (hidden,),
            ROUTER: (experts, hidden),
            EXPERTS_FC1: (experts, 2 * ffn, hidden),
            EXPERTS_FC2: (experts, hidden, ffn),
        }
        if mapping.megatron in shapes:
            return shapes[mapping.megatron]
        return super().megatron_shape(mapping, architecture)
