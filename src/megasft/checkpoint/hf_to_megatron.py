"""Hugging Face model directory -> megatron-core `dist_checkpointing` checkpoint.

Everything is validated from file headers before any tensor is read: the architecture from
config.json, then the name, shape and dtype of every weight against the family's mapping
table. Writing then streams: each chunk of a megatron tensor (a block of rows of one layer)
is copied from the byte ranges of the HF tensors it is made of, in order, before the next.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from megasft.checkpoint import mappings
from megasft.checkpoint.dist_checkpoint_io import ChunkToWrite, write_dist_checkpoint
from megasft.checkpoint.errors import CheckpointError
from megasft.checkpoint.layout import ARCHITECTURE_FILE, HF_FILES_DIR, copy_hf_metadata_files
from megasft.checkpoint.safetensors_io import HFWeightsReader
from megasft.checkpoint.tensor_bytes import ByteSource, ZeroBytes, byte_count
from megasft.megatron.architecture import (
    ModelArchitecture,
    architecture_from_hf_config,
    read_hf_config,
)
from megasft.megatron.families.weight_mapping import (
    VOCAB_PADDED,
    ExpertsGateUp,
    FusedGateUp,
    FusedQKV,
    TensorMapping,
)

logger = logging.getLogger(__name__)


def convert_hf_to_megatron(
    source: Path, destination: Path, *, allow_pytorch_bin: bool = False
) -> ModelArchitecture:
    """Write the megatron checkpoint of the HF model in `source` into `destination` (which
    the caller creates and later renames into place). Returns the architecture."""
    architecture = architecture_from_hf_config(read_hf_config(source), str(source / "config.json"))
    weights = HFWeightsReader(source, allow_pytorch_bin=allow_pytorch_bin)
    table = mappings.mappings_for(architecture)
    check_hf_weights(weights, architecture, table)

    write_dist_checkpoint(destination, plan_megatron_chunks(weights, architecture, table))
    architecture.save(destination / ARCHITECTURE_FILE)
    copied = copy_hf_metadata_files(source, destination / HF_FILES_DIR)
    if not any(name.startswith("tokenizer") for name in copied):
        logger.warning("%s: no tokenizer files found; the checkpoint carries none", source)
    return architecture


def check_hf_weights(
    weights: HFWeightsReader, architecture: ModelArchitecture, table: tuple[TensorMapping, ...]
) -> str:
    """Check that the weights are exactly the family's tensors with the config's shapes.

    Returns their dtype (a safetensors name). Missing tensors, extra tensors (e.g. biases of
    another family) and shape mismatches are refused here, before anything is written."""
    expected: dict[str, tuple[int, ...]] = {}
    for mapping in table:
        shapes = mappings.hf_shapes(mapping, architecture)
        for layer in mappings.layers_of(mapping, architecture):
            for expert in mappings.experts_of(mapping, architecture):
                names = [mappings.hf_name(name, layer, expert) for name in mapping.hf_names]
                expected.update(zip(names, shapes, strict=True))

    present = {
        name
        for name in weights.tensors
        if not name.endswith(mappings.IGNORED_HF_TENSOR_SUFFIXES)
        # Tied models sometimes store the (identical) output weights anyway.
        and not (architecture.tied_embeddings and name == "lm_head.weight")
    }
    directory = weights.directory
    missing = sorted(expected.keys() - present)
    if missing:
        raise CheckpointError(
            f"{directory}: {len(missing)} weight(s) that a {architecture.family} model with this "
            f"config.json needs are missing, e.g. {missing[0]!r}; the checkpoint is incomplete "
            "or belongs to another model family"
        )
    unexpected = sorted(present - expected.keys())
    if unexpected:
        raise CheckpointError(
            f"{directory}: {len(unexpected)} weight(s) do not belong to a {architecture.family} "
            f"model with this config.json, e.g. {unexpected[0]!r}; the weights and config.json "
            "are of different models"
        )
    for name, shape in expected.items():
        info = weights.tensors[name]
        if info.shape != shape:
            raise CheckpointError(
                f"{info.file}: {name!r} has shape {list(info.shape)}, but config.json implies "
                f"{list(shape)}; the weights and config.json are of different models"
            )
    dtypes = {weights.tensors[name].dtype for name in expected}
    if len(dtypes) != 1:
        raise CheckpointError(
            f"{directory}: weights mix dtypes {sorted(dtypes)}; megasft expects one"
        )
    return dtypes.pop()


def plan_megatron_chunks(
    weights: HFWeightsReader, architecture: ModelArchitecture, table: tuple[TensorMapping, ...]
) -> list[ChunkToWrite]:
    """The chunks of every megatron tensor (per layer for layer tensors), each producing,
    when it is written, the bytes of the HF tensors it is made of.

    A megatron tensor is written as blocks of rows, so that most chunks are an HF tensor
    as it is: fc1 as its gate rows then its up rows (the two chunks megatron-core itself
    saves), a vocabulary-padded tensor as the HF rows then the zero padding. The fused QKV
    is one chunk, the heads of q, k and v in megatron-core's order (`mappings.qkv_blocks`).
    An experts tensor [experts, rows, ...] is written as the same blocks of rows, each
    spanning every expert: the gate rows of every expert, then their up rows.
    """
    chunks = []
    for mapping in table:
        shape = mappings.megatron_shape(mapping, architecture)
        experts = mappings.experts_of(mapping, architecture)
        # An experts tensor's rows are its second axis; its first is the expert.
        expert_axis = (len(experts),) if experts != (None,) else ()
        row_shape = shape[len(expert_axis) :]
        for layer in mappings.layers_of(mapping, architecture):
            place = mappings.placement(mapping, architecture, layer)
            dtype = weights.tensors[mappings.hf_name(mapping.hf_names[0], layer, experts[0])].dtype
            blocks_per_expert = [
                _row_blocks(weights, architecture, mapping, layer, expert) for expert in experts
            ]
            for blocks in zip(*blocks_per_expert, strict=True):
                first_row, rows, _ = blocks[0]
                # [1, (experts,) rows, ...] at (layer, (0,) first_row, 0, ...) of a stacked
                # tensor: the same bytes as [(experts,) rows, ...]
                chunks.append(
                    ChunkToWrite(
                        key=place.key,
                        global_shape=place.global_shape,
                        offsets=(*place.index, *(0,) * len(expert_axis), first_row)
                        + (0,) * (len(row_shape) - 1),
                        shape=(*(1,) * len(place.index), *expert_axis, rows, *row_shape[1:]),
                        dtype=dtype,
                        produce=_concatenated([produce for _, _, produce in blocks]),
                    )
                )
    return chunks


RowBlock = tuple[int, int, Callable[[], tuple[ByteSource, ...]]]
"""(first row, row count, producer of the bytes) of one block of a megatron tensor's rows."""


def _concatenated(
    producers: list[Callable[[], tuple[ByteSource, ...]]],
) -> Callable[[], tuple[ByteSource, ...]]:
    """A producer of the bytes of `producers`, one after another (one per expert)."""
    if len(producers) == 1:
        return producers[0]
    return lambda: tuple(source for produce in producers for source in produce())


def _row_blocks(
    weights: HFWeightsReader,
    architecture: ModelArchitecture,
    mapping: TensorMapping,
    layer: int | None,
    expert: int | None,
) -> list[RowBlock]:
    """The row blocks of one layer's tensor of `mapping` (of one expert's, for experts)."""
    names = [mappings.hf_name(name, layer, expert) for name in mapping.hf_names]
    if isinstance(mapping, FusedQKV):
        rows = mappings.megatron_shape(mapping, architecture)[0]
        return [(0, rows, lambda: _fused_qkv(weights, architecture, names))]
    if isinstance(mapping, FusedGateUp | ExpertsGateUp):
        gate, up = names
        gate_rows, up_rows = mappings.gate_up_rows(architecture, mapping)
        return [
            (gate_rows.start, gate_rows.stop - gate_rows.start, lambda: (weights.read(gate),)),
            (up_rows.start, up_rows.stop - up_rows.start, lambda: (weights.read(up),)),
        ]
    (name,) = names
    info = weights.tensors[name]
    rows = info.shape[0]
    blocks: list[RowBlock] = [(0, rows, lambda: (weights.read(name),))]
    if mapping.megatron in VOCAB_PADDED and architecture.padded_vocab_size > rows:
        padding = ZeroBytes(
            byte_count((architecture.padded_vocab_size - rows, *info.shape[1:]), info.dtype)
        )
        blocks.append((rows, architecture.padded_vocab_size - rows, lambda: (padding,)))
    return blocks


def _fused_qkv(
    weights: HFWeightsReader, architecture: ModelArchitecture, names: list[str]
) -> tuple[ByteSource, ...]:
    """The fused QKV's bytes: the rows of q, k and v in `mappings.qkv_blocks` order."""
    parts = [weights.read(name) for name in names]
    info = weights.tensors[names[0]]
    row_bytes = byte_count(info.shape[1:], info.dtype)  # weight [rows, hidden]; bias [rows]
    return tuple(
        parts[block.part].slice(block.hf_first_row * row_bytes, block.rows * row_bytes)
        for block in mappings.qkv_blocks(architecture)
    )
