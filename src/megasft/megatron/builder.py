"""Build the megatron-core `TransformerConfig` and `GPTModel` of a `ModelArchitecture`.

The model reproduces the Hugging Face one exactly (the tests check logits): the model's family
(`megasft.megatron.families`) gives its norms, activation, biases, QK norm, sliding window and
layer spec; this module adds the sizes, parallelism, precision, RoPE (theta and Llama-3
scaling) and tied or untied embeddings. Transformer Engine layers are used when TE is
importable and an accelerator is present; megatron-core's local layers otherwise (CPU, tests);
`attention="torch"` swaps in the torch core attention (`megasft.megatron.torch_attention`).
Both specs save the same checkpoint keys, so either loads a checkpoint written by the other.

Megatron-core must be initialised (`megasft.megatron.parallel.initialize_parallel`) before a
model is built: the layers read their TP/PP ranks from `parallel_state`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megasft.errors import ConfigError
from megasft.megatron import families
from megasft.megatron.architecture import ModelArchitecture
from megasft.megatron.compat import version_specific_config_fields
from megasft.megatron.cpu import accelerator_present
from megasft.megatron.rope import llama3_inverse_frequencies


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports and there is an accelerator to run it on."""
    if not accelerator_present():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config(
    architecture: ModelArchitecture,
    *,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    expert_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
    params_dtype: torch.dtype = torch.float32,
    perform_initialization: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> TransformerConfig:
    """The megatron-core config of `architecture` at the given parallel sizes.

    `expert_parallel_size` (EP) splits an MoE layer's experts over that many ranks, and
    `expert_tensor_parallel_size` (ETP, default TP) each expert's matrices. `params_dtype` bf16
    sets megatron-core's bf16 mode too. `overrides` are further `TransformerConfig` fields for
    the trainer (recomputation, sequence parallelism, the load-balancing loss, ...).

    Raises:
        ConfigError: a parallel size does not divide what it splits, or EP/ETP > 1 for a
            dense model.
    """
    a = architecture
    if expert_tensor_parallel_size is None:
        expert_tensor_parallel_size = tensor_parallel_size
    _check_divisible(
        a,
        tensor_parallel_size,
        pipeline_parallel_size,
        expert_parallel_size,
        expert_tensor_parallel_size,
    )
    fields: dict[str, Any] = dict(
        num_layers=a.num_layers,
        hidden_size=a.hidden_size,
        ffn_hidden_size=a.ffn_hidden_size,
        num_attention_heads=a.num_attention_heads,
        num_query_groups=a.num_query_groups,
        kv_channels=a.head_dim,
        **families.family_named(a.family).transformer_config_fields(a),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        expert_model_parallel_size=expert_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        perform_initialization=perform_initialization,
        use_cpu_initialization=not accelerator_present(),
        gradient_accumulation_fusion=False,
        **version_specific_config_fields(),
    )
    fields.update(overrides or {})
    return TransformerConfig(**fields)


def layer_spec(
    architecture: ModelArchitecture,
    config: TransformerConfig,
    *,
    transformer_engine: bool | None = None,
    vp_stage: int | None = None,
    attention: str | None = None,
) -> ModuleSpec | TransformerBlockSubmodules:
    """The family's transformer layer spec (or, for a model whose layers differ, this stage's
    block spec): Transformer Engine when available (or asked), else megatron-core's local
    layers.

    Args:
        architecture: the model.
        config: its megatron-core config (a block spec picks this stage's layers with it).
        transformer_engine: Transformer Engine layers; None: where it is available.
        vp_stage: the virtual pipeline stage whose layers a block spec holds.
        attention: "torch" puts `TorchDotProductAttention` in every layer's core attention;
            "te" asks for Transformer Engine's (and its layers); None keeps the spec's own.

    Returns:
        The spec of one transformer layer, or of this stage's block.
    """
    if attention == "te":
        transformer_engine = True
    elif transformer_engine is None:
        transformer_engine = transformer_engine_available()
    family = families.family_named(architecture.family)
    spec = family.layer_spec(
        architecture, config, transformer_engine=transformer_engine, vp_stage=vp_stage
    )
    if attention == "torch":
        from megasft.megatron.torch_attention import TorchDotProductAttention

        spec = with_core_attention(spec, TorchDotProductAttention)
    return spec


def with_core_attention(
    spec: ModuleSpec | TransformerBlockSubmodules, core_attention: type
) -> ModuleSpec | TransformerBlockSubmodules:
    """A copy of a transformer layer spec (or of each layer's in a block spec) whose
    self-attention uses `core_attention`."""
    if isinstance(spec, TransformerBlockSubmodules):
        layers = [with_core_attention(layer, core_attention) for layer in spec.layer_specs]
        return dataclasses.replace(spec, layer_specs=layers)
    attention = spec.submodules.self_attention
    attention = dataclasses.replace(
        attention,
        submodules=dataclasses.replace(attention.submodules, core_attention=core_attention),
    )
    return dataclasses.replace(
        spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention)
    )


def build_model(
    architecture: ModelArchitecture,
    config: TransformerConfig,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    parallel_output: bool = True,
    vp_stage: int | None = None,
    transformer_engine: bool | None = None,
    attention: str | None = None,
) -> GPTModel:
    """The `GPTModel` of this pipeline stage.

    `pre_process` / `post_process` (embedding / output layer present) default to whether this
    rank is the first / last pipeline stage. `parallel_output=False` gathers the logits over
    tensor-parallel ranks ([b, s, padded_vocab] on every rank) instead of leaving each rank
    its vocabulary shard (what vocab-parallel cross entropy wants). `transformer_engine` and
    `attention` choose the layers (see `layer_spec`).
    """
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(
            ignore_virtual=False, vp_stage=vp_stage
        )
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(
            ignore_virtual=False, vp_stage=vp_stage
        )
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(
            architecture,
            config,
            transformer_engine=transformer_engine,
            vp_stage=vp_stage,
            attention=attention,
        ),
        vocab_size=architecture.padded_vocab_size,
        max_sequence_length=architecture.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=architecture.tied_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=architecture.rope_theta,
        # megatron-core's own Llama-3 scaling hard-codes low/high frequency factors 1 and 4
        # and an original context of 8192; the exact frequencies are set below instead.
        rope_scaling=False,
        vp_stage=vp_stage,
    )
    if architecture.rope_scaling is not None:
        model.rotary_pos_emb.inv_freq = llama3_inverse_frequencies(
            architecture.head_dim, architecture.rope_theta, architecture.rope_scaling
        ).to(model.rotary_pos_emb.inv_freq.device)
    return model


def _check_divisible(
    architecture: ModelArchitecture,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    expert_parallel_size: int,
    expert_tensor_parallel_size: int,
) -> None:
    a = architecture
    has_dense_layers = a.moe is None or len(a.moe.moe_layers) < a.num_layers
    requirements = {
        "num_attention_heads": a.num_attention_heads,
        "num_key_value_heads": a.num_query_groups,
        "padded vocabulary": a.padded_vocab_size,
        **({"intermediate_size": a.ffn_hidden_size} if has_dense_layers else {}),
    }
    for name, value in requirements.items():
        if value % tensor_parallel_size:
            raise ConfigError(
                f"tensor parallel size {tensor_parallel_size} does not divide {name} ({value}); "
                "choose a TP size that does"
            )
    if a.num_layers % pipeline_parallel_size:
        raise ConfigError(
            f"pipeline parallel size {pipeline_parallel_size} does not divide the "
            f"{a.num_layers} layers; choose a PP size that does"
        )
    if a.moe is None:
        if expert_parallel_size > 1 or expert_tensor_parallel_size != tensor_parallel_size:
            raise ConfigError(
                f"expert parallelism (EP={expert_parallel_size}, ETP="
                f"{expert_tensor_parallel_size}) needs a mixture-of-experts model; "
                f"{a.family} is dense"
            )
        return
    if a.moe.num_experts % expert_parallel_size:
        raise ConfigError(
            f"expert parallel size {expert_parallel_size} does not divide the "
            f"{a.moe.num_experts} experts; choose an EP size that does"
        )
    if a.moe.expert_ffn_hidden_size % expert_tensor_parallel_size:
        raise ConfigError(
            f"expert tensor parallel size {expert_tensor_parallel_size} does not divide the "
            f"experts' intermediate size ({a.moe.expert_ffn_hidden_size}); choose an ETP "
            "size that does"
        )
