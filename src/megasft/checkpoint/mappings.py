"""Applying a family's weight-mapping table: tensor names, shapes and fused-tensor layouts.

The tables are data, in each model family's module (`megasft.megatron.families`; the kinds
of entry in `megasft.megatron.families.weight_mapping`). This module turns an entry into
what the converters need: its checkpoint key, the shapes of its tensors on either side, and
the rows of a fused megatron tensor that each HF tensor fills. See docs/convert.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from megasft.megatron import families
from megasft.megatron.architecture import ModelArchitecture
from megasft.megatron.families.weight_mapping import (
    VOCAB_PADDED,
    FusedGateUp,
    FusedQKV,
    TensorMapping,
)

IGNORED_HF_TENSOR_SUFFIXES = (".rotary_emb.inv_freq",)
"""HF tensors that older checkpoints carry but that are recomputed, never learned."""


def mappings_for(architecture: ModelArchitecture) -> tuple[TensorMapping, ...]:
    """The weight-mapping table of `architecture`, from its family.

    Args:
        architecture: the model's architecture.

    Returns:
        The table; without the output layer when it is tied to the embedding.
    """
    return families.family_named(architecture.family).weight_mappings(architecture)


def is_layer_mapping(mapping: TensorMapping) -> bool:
    """Whether `mapping` is one tensor per layer (its names hold `{layer}`)."""
    return "{layer}" in mapping.megatron


def stacked_key(megatron_name: str) -> str:
    """The checkpoint key of a per-layer tensor: megatron-core stacks the layers of a
    `TransformerBlock` into one tensor per parameter ("decoder.layers.{layer}.x" ->
    "decoder.layers.x", with the layer as the leading axis)."""
    return megatron_name.replace(".{layer}.", ".")


@dataclass(frozen=True)
class QKVBlock:
    """A block of consecutive rows of megatron-core's fused QKV, taken from HF q, k or v."""

    part: int
    """0, 1 or 2: from q, k or v."""
    hf_first_row: int
    fused_first_row: int
    rows: int


def qkv_blocks(architecture: ModelArchitecture) -> tuple[QKVBlock, ...]:
    """megatron linear_qkv [(heads+2*groups)*d, ...] as blocks of HF q [heads*d, ...], k and
    v [groups*d, ...], in fused order.

    megatron-core interleaves per query group: for each group g, the query heads of g, then
    k_g, then v_g. Tensor parallelism splits dim 0 into contiguous blocks of whole groups, so
    this one layout serves every TP size. The same blocks serve weights ([rows, hidden]) and
    biases ([rows]); the converters copy each block's bytes.
    """
    groups = architecture.num_query_groups
    head_dim = architecture.head_dim
    query_rows = architecture.num_attention_heads // groups * head_dim  # per group
    blocks = []
    fused_row = 0
    for group in range(groups):
        for part, rows in ((0, query_rows), (1, head_dim), (2, head_dim)):
            blocks.append(QKVBlock(part, group * rows, fused_row, rows))
            fused_row += rows
    return tuple(blocks)


def gate_up_rows(architecture: ModelArchitecture) -> tuple[slice, slice]:
    """The rows of megatron linear_fc1 [2*ffn, hidden] holding HF gate and up [ffn, hidden].

    Megatron-core's gated MLP applies the activation to the first half of fc1's output, and
    its checkpoint stores the two halves as separate chunks (each sharded over TP on its
    own), which is also how the converter writes and reads them."""
    ffn = architecture.ffn_hidden_size
    return slice(0, ffn), slice(ffn, 2 * ffn)


def megatron_shape(mapping: TensorMapping, architecture: ModelArchitecture) -> tuple[int, ...]:
    """The shape of one (per-layer) megatron tensor of `mapping`, as its family says."""
    return families.family_named(architecture.family).megatron_shape(mapping, architecture)


def hf_shapes(
    mapping: TensorMapping, architecture: ModelArchitecture
) -> tuple[tuple[int, ...], ...]:
    """The shapes of the HF tensors of `mapping`, in `mapping.hf_names` order."""
    a = architecture
    shape = megatron_shape(mapping, architecture)
    if isinstance(mapping, FusedQKV):
        q_rows = a.num_attention_heads * a.head_dim
        kv_rows = a.num_query_groups * a.head_dim
        return ((q_rows, *shape[1:]), (kv_rows, *shape[1:]), (kv_rows, *shape[1:]))
    if isinstance(mapping, FusedGateUp):
        return ((a.ffn_hidden_size, a.hidden_size),) * 2
    if mapping.megatron in VOCAB_PADDED:
        return ((a.vocab_size, a.hidden_size),)
    return (shape,)
