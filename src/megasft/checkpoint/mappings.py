"""Hugging Face <-> megatron-core weight names, one table per model family.

A table is data: each entry names one megatron-core tensor (by the key it has in a
`dist_checkpointing` checkpoint) and the Hugging Face tensor(s) it is made of. `{layer}`
stands for the layer number. Three kinds of entry cover every supported family:

- `Rename`: the same tensor under another name;
- `FusedQKV`: megatron-core's `linear_qkv`, the query, key and value projections fused and
  interleaved per query group (see `fuse_qkv`);
- `FusedGateUp`: megatron-core's `linear_fc1`, the gate and up projections stacked
  ([gate; up], the order megatron-core's gated MLP splits them in; see `gate_up_rows`).

Checkpoint keys are the ones megatron-core writes for both its local and its Transformer
Engine layer specs: the local spec's `input_layernorm` and `pre_mlp_layernorm` are saved as
`self_attention.linear_qkv.layer_norm_weight` and `mlp.linear_fc1.layer_norm_weight`, the
names of the norms that Transformer Engine fuses into the following linear layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megasft.megatron.architecture import ModelArchitecture

if TYPE_CHECKING:
    import torch


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

_HF_LAYER = "model.layers.{layer}"
_MEGATRON_LAYER = "decoder.layers.{layer}"

LLAMA: tuple[TensorMapping, ...] = (
    Rename(EMBEDDING, "model.embed_tokens.weight"),
    Rename(
        f"{_MEGATRON_LAYER}.self_attention.linear_qkv.layer_norm_weight",
        f"{_HF_LAYER}.input_layernorm.weight",
    ),
    FusedQKV(
        f"{_MEGATRON_LAYER}.self_attention.linear_qkv.weight",
        q=f"{_HF_LAYER}.self_attn.q_proj.weight",
        k=f"{_HF_LAYER}.self_attn.k_proj.weight",
        v=f"{_HF_LAYER}.self_attn.v_proj.weight",
    ),
    Rename(
        f"{_MEGATRON_LAYER}.self_attention.linear_proj.weight",
        f"{_HF_LAYER}.self_attn.o_proj.weight",
    ),
    Rename(
        f"{_MEGATRON_LAYER}.mlp.linear_fc1.layer_norm_weight",
        f"{_HF_LAYER}.post_attention_layernorm.weight",
    ),
    FusedGateUp(
        f"{_MEGATRON_LAYER}.mlp.linear_fc1.weight",
        gate=f"{_HF_LAYER}.mlp.gate_proj.weight",
        up=f"{_HF_LAYER}.mlp.up_proj.weight",
    ),
    Rename(f"{_MEGATRON_LAYER}.mlp.linear_fc2.weight", f"{_HF_LAYER}.mlp.down_proj.weight"),
    Rename("decoder.final_layernorm.weight", "model.norm.weight"),
    Rename(OUTPUT_LAYER, "lm_head.weight"),
)

MISTRAL = LLAMA

QWEN2 = (
    *LLAMA,
    FusedQKV(
        f"{_MEGATRON_LAYER}.self_attention.linear_qkv.bias",
        q=f"{_HF_LAYER}.self_attn.q_proj.bias",
        k=f"{_HF_LAYER}.self_attn.k_proj.bias",
        v=f"{_HF_LAYER}.self_attn.v_proj.bias",
    ),
)

QWEN3 = (
    *LLAMA,
    Rename(
        f"{_MEGATRON_LAYER}.self_attention.q_layernorm.weight",
        f"{_HF_LAYER}.self_attn.q_norm.weight",
    ),
    Rename(
        f"{_MEGATRON_LAYER}.self_attention.k_layernorm.weight",
        f"{_HF_LAYER}.self_attn.k_norm.weight",
    ),
)

FAMILY_MAPPINGS: dict[str, tuple[TensorMapping, ...]] = {
    "llama": LLAMA,
    "mistral": MISTRAL,
    "qwen2": QWEN2,
    "qwen3": QWEN3,
}

IGNORED_HF_TENSOR_SUFFIXES = (".rotary_emb.inv_freq",)
"""HF tensors that older checkpoints carry but that are recomputed, never learned."""


def mappings_for(architecture: ModelArchitecture) -> tuple[TensorMapping, ...]:
    """The family's table; without the output layer when it is tied to the embedding
    (megatron-core then keeps the one tensor under the embedding's key)."""
    table = FAMILY_MAPPINGS[architecture.family]
    if architecture.tied_embeddings:
        table = tuple(mapping for mapping in table if mapping.megatron != OUTPUT_LAYER)
    return table


def is_layer_mapping(mapping: TensorMapping) -> bool:
    return "{layer}" in mapping.megatron


def stacked_key(megatron_name: str) -> str:
    """The checkpoint key of a per-layer tensor: megatron-core stacks the layers of a
    `TransformerBlock` into one tensor per parameter ("decoder.layers.{layer}.x" ->
    "decoder.layers.x", with the layer as the leading axis)."""
    return megatron_name.replace(".{layer}.", ".")


# --- fused tensors -------------------------------------------------------------------------------


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


def fuse_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, architecture: ModelArchitecture
) -> torch.Tensor:
    """HF q [heads*d, ...], k and v [groups*d, ...] -> megatron linear_qkv
    [(heads+2*groups)*d, ...], the `qkv_blocks` layout on tensors."""
    parts = (q, k, v)
    fused = q.new_empty((q.shape[0] + k.shape[0] + v.shape[0], *q.shape[1:]))
    for block in qkv_blocks(architecture):
        source = parts[block.part][block.hf_first_row : block.hf_first_row + block.rows]
        fused[block.fused_first_row : block.fused_first_row + block.rows] = source
    return fused


def split_qkv(
    qkv: torch.Tensor, architecture: ModelArchitecture
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `fuse_qkv`: megatron linear_qkv -> HF (q, k, v)."""
    query_rows = architecture.num_attention_heads * architecture.head_dim
    kv_rows = architecture.num_query_groups * architecture.head_dim
    trailing = qkv.shape[1:]
    parts = tuple(qkv.new_empty((rows, *trailing)) for rows in (query_rows, kv_rows, kv_rows))
    for block in qkv_blocks(architecture):
        target = parts[block.part][block.hf_first_row : block.hf_first_row + block.rows]
        target[...] = qkv[block.fused_first_row : block.fused_first_row + block.rows]
    q, k, v = parts
    return q, k, v


def gate_up_rows(architecture: ModelArchitecture) -> tuple[slice, slice]:
    """The rows of megatron linear_fc1 [2*ffn, hidden] holding HF gate and up [ffn, hidden].

    Megatron-core's gated MLP applies the activation to the first half of fc1's output, and
    its checkpoint stores the two halves as separate chunks (each sharded over TP on its
    own), which is also how the converter writes and reads them."""
    ffn = architecture.ffn_hidden_size
    return slice(0, ffn), slice(ffn, 2 * ffn)


def megatron_shape(mapping: TensorMapping, architecture: ModelArchitecture) -> tuple[int, ...]:
    """The shape of one (per-layer) megatron tensor of `mapping`."""
    a = architecture
    qkv_rows = (a.num_attention_heads + 2 * a.num_query_groups) * a.head_dim
    name = mapping.megatron.rsplit("{layer}.", 1)[-1]
    shapes = {
        EMBEDDING: (a.padded_vocab_size, a.hidden_size),
        OUTPUT_LAYER: (a.padded_vocab_size, a.hidden_size),
        "decoder.final_layernorm.weight": (a.hidden_size,),
        "self_attention.linear_qkv.layer_norm_weight": (a.hidden_size,),
        "self_attention.linear_qkv.weight": (qkv_rows, a.hidden_size),
        "self_attention.linear_qkv.bias": (qkv_rows,),
        "self_attention.linear_proj.weight": (a.hidden_size, a.num_attention_heads * a.head_dim),
        "self_attention.q_layernorm.weight": (a.head_dim,),
        "self_attention.k_layernorm.weight": (a.head_dim,),
        "mlp.linear_fc1.layer_norm_weight": (a.hidden_size,),
        "mlp.linear_fc1.weight": (2 * a.ffn_hidden_size, a.hidden_size),
        "mlp.linear_fc2.weight": (a.hidden_size, a.ffn_hidden_size),
    }
    return shapes[name]


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
