"""Hugging Face <-> megatron-core weight names as data: the entries of a family's table.

Each entry names one megatron-core tensor (its `dist_checkpointing` key; `{layer}` stands for
the layer number, `{expert}` for the expert's) and the HF tensor(s) it is made of: `Rename`,
`FusedQKV` (per query group), `FusedGateUp` ([gate; up]), and for an MoE layer's experts,
whose megatron-core tensors have the expert as leading axis, `ExpertsRename` and
`ExpertsGateUp`. A per-layer entry covers every layer unless its `layers` names some (dense
and MoE layers mixed). `DECODER` is the table every family starts from; its keys are those
megatron-core writes for both its local and its Transformer Engine layer specs.
See docs/convert.md, "Weight names: one table per family".
"""

from __future__ import annotations

from dataclasses import dataclass, field

Layers = tuple[int, ...] | None
"""The layers that have an entry's tensor; None: every layer (or a tensor outside the layers)."""


@dataclass(frozen=True)
class Rename:
    """A megatron tensor that is one HF tensor under another name."""

    megatron: str
    hf: str
    layers: Layers = field(default=None, kw_only=True)

    @property
    def hf_names(self) -> tuple[str, ...]:
        """The HF tensor this entry reads or writes."""
        return (self.hf,)


@dataclass(frozen=True)
class FusedQKV:
    """megatron-core's fused `linear_qkv` weight or bias, from HF q, k and v projections."""

    megatron: str
    q: str
    k: str
    v: str
    layers: Layers = field(default=None, kw_only=True)

    @property
    def hf_names(self) -> tuple[str, ...]:
        """The HF tensors fused into this entry: q, k, v."""
        return (self.q, self.k, self.v)


@dataclass(frozen=True)
class FusedGateUp:
    """megatron-core's `linear_fc1` weight, from the HF gate and up projections."""

    megatron: str
    gate: str
    up: str
    layers: Layers = field(default=None, kw_only=True)

    @property
    def hf_names(self) -> tuple[str, ...]:
        """The HF tensors fused into this entry: gate, up."""
        return (self.gate, self.up)


@dataclass(frozen=True)
class ExpertsRename:
    """A megatron expert tensor [experts, ...]: expert e is HF tensor `hf` with {expert} = e."""

    megatron: str
    hf: str
    layers: Layers = field(default=None, kw_only=True)

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)


@dataclass(frozen=True)
class ExpertsGateUp:
    """megatron-core's expert `linear_fc1` [experts, 2*ffn, hidden]: per expert, its HF gate
    and up projections stacked as in `FusedGateUp`."""

    megatron: str
    gate: str
    up: str
    layers: Layers = field(default=None, kw_only=True)

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.gate, self.up)


TensorMapping = Rename | FusedQKV | FusedGateUp | ExpertsRename | ExpertsGateUp

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
VOCAB_PADDED = frozenset({EMBEDDING, OUTPUT_LAYER})
"""megatron tensors with one row per padded vocabulary entry: the HF rows, then zero rows up
to `padded_vocab_size` (added on import, dropped on export)."""

HF_LAYER = "model.layers.{layer}"
MEGATRON_LAYER = "decoder.layers.{layer}"

DENSE_MLP: tuple[TensorMapping, ...] = (
    Rename(
        f"{MEGATRON_LAYER}.mlp.linear_fc1.layer_norm_weight",
        f"{HF_LAYER}.post_attention_layernorm.weight",
    ),
    FusedGateUp(
        f"{MEGATRON_LAYER}.mlp.linear_fc1.weight",
        gate=f"{HF_LAYER}.mlp.gate_proj.weight",
        up=f"{HF_LAYER}.mlp.up_proj.weight",
    ),
    Rename(f"{MEGATRON_LAYER}.mlp.linear_fc2.weight", f"{HF_LAYER}.mlp.down_proj.weight"),
)
"""A dense layer's MLP and the norm before it (part of `DECODER`)."""

DECODER: tuple[TensorMapping, ...] = (
    Rename(EMBEDDING, "model.embed_tokens.weight"),
    Rename(
        f"{MEGATRON_LAYER}.self_attention.linear_qkv.layer_norm_weight",
        f"{HF_LAYER}.input_layernorm.weight",
    ),
    FusedQKV(
        f"{MEGATRON_LAYER}.self_attention.linear_qkv.weight",
        q=f"{HF_LAYER}.self_attn.q_proj.weight",
        k=f"{HF_LAYER}.self_attn.k_proj.weight",
        v=f"{HF_LAYER}.self_attn.v_proj.weight",
    ),
    Rename(
        f"{MEGATRON_LAYER}.self_attention.linear_proj.weight",
        f"{HF_LAYER}.self_attn.o_proj.weight",
    ),
    *DENSE_MLP,
    Rename("decoder.final_layernorm.weight", "model.norm.weight"),
    Rename(OUTPUT_LAYER, "lm_head.weight"),
)
"""The table of a Llama-style decoder, the output layer included."""
