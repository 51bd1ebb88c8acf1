"""`ModelFamily`: what a model family decides, with the answers of a Llama-style decoder.

A family subclass sets its Hugging Face names and overrides only what differs: how its
config.json becomes `ModelArchitecture` fields (and back), which megatron-core
`TransformerConfig` fields and layer spec build it, and its weight-mapping table. Nothing here
imports torch or megatron-core until a model is built. See docs/convert.md
("Adding a model family").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from megasft.errors import ConfigError
from megasft.megatron.families.weight_mapping import (
    DECODER,
    EMBEDDING,
    OUTPUT_LAYER,
    TensorMapping,
)
from megasft.megatron.hf_config import ConfigReader, read_rope

if TYPE_CHECKING:
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megasft.megatron.architecture import ModelArchitecture


class ModelFamily:
    """A decoder-only family as megatron-core's `GPTModel` builds it.

    The defaults are a Llama-style decoder: RMSNorm, SwiGLU MLP, RoPE, no biases, grouped-query
    attention, tied or untied embeddings. Subclasses are registered with
    `megasft.megatron.families.registry.register`, one instance per family.
    """

    model_type: ClassVar[str]
    """Hugging Face `model_type` of config.json; also `ModelArchitecture.family`."""
    hf_architecture_class: ClassVar[str]
    """The one `architectures` entry accepted in config.json and written to it."""
    hidden_act: ClassVar[str] = "silu"
    """The HF MLP activation (`hidden_act`) the megatron-core model reproduces."""
    normalization: ClassVar[str] = "RMSNorm"
    """megatron-core's name of the norm before attention, before the MLP and at the end."""

    # --- config.json -> ModelArchitecture ------------------------------------------------------

    def check_config(self, config: ConfigReader) -> None:
        """Refuse a config whose model the megatron-core model could not reproduce exactly.

        Args:
            config: the family's config.json.

        Raises:
            ConfigError: naming the config field.
        """
        if config.get("hidden_act", str, default=self.hidden_act) != self.hidden_act:
            raise ConfigError(
                f"{config.source}: hidden_act must be {self.hidden_act!r} for {self.model_type}"
            )
        self.check_projection_biases(config)
        self.check_attention_layers(config)

    def check_projection_biases(self, config: ConfigReader) -> None:
        """Refuse biases on the attention or MLP projections (see `check_config`)."""
        for field in ("attention_bias", "mlp_bias"):
            if config.get(field, bool, default=False):
                raise ConfigError(
                    f"{config.source}: {field} is true; megatron-core's GPTModel cannot add "
                    "biases to these projections alone, so such models are not supported"
                )

    def check_attention_layers(self, config: ConfigReader) -> None:
        """Refuse layers of another kind than full attention (see `check_config`)."""
        layer_types = config.config.get("layer_types") or []
        if any(layer_type != "full_attention" for layer_type in layer_types):
            raise ConfigError(
                f"{config.source}: layer_types has layers other than full_attention; not supported"
            )

    def architecture_fields(self, config: ConfigReader) -> dict[str, Any]:
        """The `ModelArchitecture` fields of a checked config, all but `family` and
        `padded_vocab_size`.

        Args:
            config: the family's config.json, once `check_config` accepted it.

        Returns:
            The fields by name.

        Raises:
            ConfigError: a field missing, of the wrong type, or with an unsupported value.
        """
        hidden_size = config.get("hidden_size", int)
        num_attention_heads = config.get("num_attention_heads", int)
        vocab_size = config.get("vocab_size", int)
        rope_theta, rope_scaling = read_rope(config)
        return dict(
            num_layers=config.get("num_hidden_layers", int),
            hidden_size=hidden_size,
            ffn_hidden_size=config.get("intermediate_size", int),
            num_attention_heads=num_attention_heads,
            num_query_groups=config.get("num_key_value_heads", int, default=num_attention_heads),
            head_dim=config.get("head_dim", int, default=hidden_size // num_attention_heads),
            vocab_size=vocab_size,
            max_position_embeddings=config.get("max_position_embeddings", int),
            norm_epsilon=config.get("rms_norm_eps", float, default=1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            qkv_bias=False,
            qk_layernorm=False,
            tied_embeddings=config.get("tie_word_embeddings", bool, default=False),
            sliding_window=None,
        )

    def hf_config_fields(self, architecture: ModelArchitecture) -> dict[str, Any]:
        """The family's own fields of a config.json written from `architecture`, beyond the
        sizes, RoPE and activation every family writes
        (`megasft.megatron.architecture.hf_config_from_architecture`).

        Args:
            architecture: an architecture of this family.

        Returns:
            The fields by name, in the order they are written.
        """
        return {"attention_bias": False}

    # --- megatron-core --------------------------------------------------------------------------

    def transformer_config_fields(self, architecture: ModelArchitecture) -> dict[str, Any]:
        """The megatron-core `TransformerConfig` fields that make its layers this family's.

        Args:
            architecture: an architecture of this family.

        Returns:
            The fields by name (sizes, parallelism and precision are the builder's).
        """
        import torch.nn.functional as F  # torch only once a model is built

        a = architecture
        return dict(
            normalization=self.normalization,
            layernorm_epsilon=a.norm_epsilon,
            gated_linear_unit=True,
            activation_func=F.silu,
            bias_activation_fusion=False,
            add_bias_linear=False,
            add_qkv_bias=a.qkv_bias,
            qk_layernorm=a.qk_layernorm,
            # HF window W covers W tokens, the query included: keys at distance 0 .. W-1.
            window_size=(a.sliding_window - 1, 0) if a.sliding_window is not None else None,
        )

    def layer_spec(
        self,
        architecture: ModelArchitecture,
        config: TransformerConfig,
        *,
        transformer_engine: bool,
        vp_stage: int | None = None,
    ) -> ModuleSpec | TransformerBlockSubmodules:
        """The megatron-core transformer layer spec of this family.

        Args:
            architecture: an architecture of this family.
            config: the model's megatron-core config.
            transformer_engine: Transformer Engine layers, else megatron-core's local layers
                (both save the same checkpoint keys).
            vp_stage: the virtual pipeline stage being built, if any.

        Returns:
            The spec of one transformer layer (every layer alike), or of this pipeline
            stage's layers when they differ.
        """
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_local_spec,
            get_gpt_layer_with_transformer_engine_spec,
        )

        if transformer_engine:
            return get_gpt_layer_with_transformer_engine_spec(
                qk_layernorm=architecture.qk_layernorm
            )
        return get_gpt_layer_local_spec(
            qk_layernorm=architecture.qk_layernorm, normalization=self.normalization
        )

    # --- weights --------------------------------------------------------------------------------

    def weight_mappings(self, architecture: ModelArchitecture) -> tuple[TensorMapping, ...]:
        """The weight-mapping table of `architecture` (see `weight_mapping`).

        Args:
            architecture: an architecture of this family.

        Returns:
            The entries; without the output layer when it is tied to the embedding
            (megatron-core then keeps the one tensor under the embedding's key).
        """
        if architecture.tied_embeddings:
            return tuple(mapping for mapping in DECODER if mapping.megatron != OUTPUT_LAYER)
        return DECODER

    def megatron_shape(
        self, mapping: TensorMapping, architecture: ModelArchitecture
    ) -> tuple[int, ...]:
        """The shape of one (per-layer) megatron tensor of this family's table.

        Args:
            mapping: an entry of `weight_mappings(architecture)`.
            architecture: an architecture of this family.

        Returns:
            The shape, of one layer for a per-layer tensor.
        """
        a = architecture
        qkv_rows = (a.num_attention_heads + 2 * a.num_query_groups) * a.head_dim
        attention_width = a.num_attention_heads * a.head_dim
        name = mapping.megatron.rsplit("{layer}.", 1)[-1]
        shapes = {
            EMBEDDING: (a.padded_vocab_size, a.hidden_size),
            OUTPUT_LAYER: (a.padded_vocab_size, a.hidden_size),
            "decoder.final_layernorm.weight": (a.hidden_size,),
            "self_attention.linear_qkv.layer_norm_weight": (a.hidden_size,),
            "self_attention.linear_qkv.weight": (qkv_rows, a.hidden_size),
            "self_attention.linear_qkv.bias": (qkv_rows,),
            "self_attention.linear_proj.weight": (a.hidden_size, attention_width),
            "self_attention.q_layernorm.weight": (a.head_dim,),
            "self_attention.k_layernorm.weight": (a.head_dim,),
            "mlp.linear_fc1.layer_norm_weight": (a.hidden_size,),
            "mlp.linear_fc1.weight": (2 * a.ffn_hidden_size, a.hidden_size),
            "mlp.linear_fc2.weight": (a.hidden_size, a.ffn_hidden_size),
        }
        return shapes[name]
