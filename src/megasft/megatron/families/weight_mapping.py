"""Hugging Face <-> megatron-core weight names as data: the entries of a family's table.

Each entry names one megatron-core tensor (by the key it has in a `dist_checkpointing`
checkpoint) and the Hugging Face tensor(s) it is made of; `{layer}` stands for the layer
number. Three kinds of entry cover every supported family:

- `Rename`: the same tensor under another name;
- `FusedQKV`: megatron-core's `linear_qkv`, the query, key and value projections fused and
  interleaved per query group (`megasft.checkpoint.mappings.qkv_blocks`);
- `FusedGateUp`: megatron-core's `linear_fc1`, the gate and up projections stacked
  ([gate; up], the order megatron-core's gated MLP splits them in).

`DECODER` is the table of the decoder every family starts from (`base.ModelFamily`). Its
checkpoint keys are the ones megatron-core writes for both its local and its Transformer
Engine layer specs: the local spec's `input_layernorm` and `pre_mlp_layernorm` are saved as
`self_attention.linear_qkv.layer_norm_weight` and `mlp.linear_fc1.layer_norm_weight`, the
names of the norms that Transformer Engine fuses into the following linear layer.
See docs/convert.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rename:
    """A megatron tensor that is one HF tensor under another name."""

    megatron: str
    hf: str

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)


@dataclass(frozen=True)
class FusedQKV:
    """megatron-core's fused `linear_qkv` weight or bias, from HF q, k and v projections."""

    megatron: str
    q: str
    k: str
    v: str

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v)


@dataclass(frozen=True)
class FusedGateUp:
    """megatron-core's `linear_fc1` weight, from the HF gate and up projections."""

    megatron: str
    gate: str
    up: str

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.gate, self.up)


TensorMapping = Rename | FusedQKV | FusedGateUp

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
VOCAB_PADDED = frozenset({EMBEDDING, OUTPUT_LAYER})
"""megatron tensors with one row per padded vocabulary entry: the HF rows, then zero rows up
to `padded_vocab_size` (added on import, dropped on export)."""

HF_LAYER = "model.layers.{layer}"
MEGATRON_LAYER = "decoder.layers.{layer}"

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
    Rename("decoder.final_layernorm.weight", "model.norm.weight"),
    Rename(OUTPUT_LAYER, "lm_head.weight"),
)
"""The table of a Llama-style decoder, the output layer included."""
