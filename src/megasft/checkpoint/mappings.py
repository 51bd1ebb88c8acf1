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
    ExpertsGateUp,
    ExpertsRename,
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


def is_experts_mapping(mapping: TensorMapping) -> bool:
    """Whether `mapping` is a tensor of an MoE layer's experts, [experts, ...] on the megatron
    side, one HF tensor per expert (its names hold `{expert}`)."""
    return isinstance(mapping, ExpertsRename | ExpertsGateUp)


def stacked_key(megatron_name: str) -> str:
    """The checkpoint key of a per-layer tensor: megatron-core stacks the layers of a
    `TransformerBlock` into one tensor per parameter ("decoder.layers.{layer}.x" ->
    "decoder.layers.x", with the layer as the leading axis)."""
    return megatron_name.replace(".{layer}.", ".")


def layers_of(mapping: TensorMapping, architecture: ModelArchitecture) -> tuple[int | None, ...]:
    """The layers that have `mapping`'s tensor; (None,) for a tensor outside the layers."""
    if not is_layer_mapping(mapping):
        return (None,)
    if mapping.layers is not None:
        return mapping.layers
    return tuple(range(architecture.num_layers))


def experts_of(mapping: TensorMapping, architecture: ModelArchitecture) -> tuple[int | None, ...]:
    """The experts of `mapping`'s tensor, each one HF tensor; (None,) for any other tensor."""
    if not is_experts_mapping(mapping):
        return (None,)
    return tuple(range(architecture.moe.num_experts))


def hf_name(template: str, layer: int | None, expert: int | None) -> str:
    """An HF tensor name of a mapping, its `{layer}` and `{expert}` filled in."""
    return template.format(layer=layer, expert=expert)


@dataclass(frozen=True)
class Placement:
    """Where one layer's tensor of a mapping lies in the checkpoint."""

    key: str
    global_shape: tuple[int, ...]
    """The shape of the checkpoint tensor `key`."""
    index: tuple[int, ...]
    """The layer's offsets on the leading axes of `global_shape` that the layer's tensor does
    not have: (layer,) in a stacked tensor, () otherwise."""


def placement(
    mapping: TensorMapping, architecture: ModelArchitecture, layer: int | None
) -> Placement:
    """Where `mapping`'s tensor of `layer` (None: not a layer's) lies in the checkpoint.

    megatron-core stacks the layers into one tensor per parameter when all layers are alike
    (`stacked_key`, the layer as the leading axis); when dense and MoE layers mix, each layer's
    tensor has its own key, "decoder.layers.{layer}.x", as megatron-core saves such a model.
    """
    shape = megatron_shape(mapping, architecture)
    if layer is None:
        return Placement(mapping.megatron, shape, ())
    if architecture.stacked_layers:
        return Placement(stacked_key(mapping.megatron), (architecture.num_layers, *shape), (layer,))
    return Placement(mapping.megatron.format(layer=layer), shape, ())


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


def gate_up_rows(
    architecture: ModelArchitecture, mapping: TensorMapping | None = None
) -> tuple[slice, slice]:
    """The rows of megatron linear_fc1 [2*ffn, hidden] holding HF gate and up [ffn, hidden]
    (of one expert, for an `ExpertsGateUp` mapping).

    Megatron-core's gated MLP applies the activation to the first half of fc1's output, and
    its checkpoint stores the two halves as separate chunks (each sharded over TP on its
    own), which is also how the converter writes and reads them."""
    ffn = architecture.ffn_hidden_size
    if mapping is not None and is_experts_mapping(mapping):
        ffn = architecture.moe.expert_ffn_hidden_size
    return slice(0, ffn), slice(ffn, 2 * ffn)


def megatron_shape(mapping: TensorMapping, architecture: ModelArchitecture) -> tuple[int, ...]:
    """The shape of one (per-layer) megatron tensor of `mapping`, as its family says."""
    return families.family_named(architecture.family).megatron_shape(mapping, architecture)


def hf_shapes(
    mapping: TensorMapping, architecture: ModelArchitecture
) -> tuple[tuple[int, ...], ...]:
    """The shapes of the HF tensors of `mapping` (of one expert), in `mapping.hf_names` order."""
    a = architecture
    shape = megatron_shape(mapping, architecture)
    if isinstance(mapping, ExpertsGateUp):
        return ((shape[1] // 2, shape[2]),) * 2
    if isinstance(mapping, ExpertsRename):
        return (shape[1:],)
    if isinstance(mapping, FusedQKV):
        q_rows = a.num_attention_heads * a.head_dim
        kv_rows = a.num_query_groups * a.head_dim
        return ((q_rows, *shape[1:]), (kv_rows, *shape[1:]), (kv_rows, *shape[1:]))
    if isinstance(mapping, FusedGateUp):
        return ((a.ffn_hidden_size, a.hidden_size),) * 2
    if mapping.megatron in VOCAB_PADDED:
        return ((a.vocab_size, a.hidden_size),)
    return (shape,)
