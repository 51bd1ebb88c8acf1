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
        for layer in _layers(mapping, architecture):
            names = [name.format(layer=layer) for name in mapping.hf_names]
            expected.update(zip(names, mappings.hf_shapes(mapping, architecture), strict=True))

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
    """
    chunks = []
    for mapping in table:
        shape = mappings.megatron_shape(mapping, architecture)
        dtype = weights.tensors[mapping.hf_names[0].format(layer=0)].dtype
        stacked = mappings.is_layer_mapping(mapping)
        key = mappings.stacked_key(mapping.megatron) if stacked else mapping.megatron
        for layer in range(architecture.num_layers) if stacked else (None,):
            for first_row, rows, produce in _row_blocks(weights, architecture, mapping, layer):
                block_offsets = (first_row,) + (0,) * (len(shape) - 1)
                block_shape = (rows, *shape[1:])
                if stacked:
                    # [1, rows, ...] at (layer, first_row, 0, ...) of [num_layers, *shape]:
                    # the same bytes as [rows, ...]
                    chunks.append(
                        ChunkToWrite(
                            key=key,
                            global_shape=(architecture.num_layers, *shape),
                            offsets=(layer, *block_offsets),
                            shape=(1, *block_shape),
                            dtype=dtype,
                            produce=produce,
                        )
                    )
                else:
                    chunks.append(
                        ChunkToWrite(key, shape, block_offsets, block_shape, dtype, produce)
                    )
    return chunks


RowBlock = tuple[int, int, Callable[[], tuple[ByteSource, ...]]]
"""(first row, row count, producer of the bytes) of one block of a megatron tensor's rows."""


def _row_blocks(
    weights: HFWeightsReader,
    architecture: ModelArchitecture,
    mapping: TensorMapping,
    layer: int | None,
) -> list[RowBlock]:
    names = [name.format(layer=layer) for name in mapping.hf_names]
    if isinstance(mapping, FusedQKV):
        rows = mappings.megatron_shape(mapping, architecture)[0]
        return [(0, rows, lambda: _fused_qkv(weights, architecture, names))]
    if isinstance(mapping, FusedGateUp):
        gate, up = names
        gate_rows, up_rows = mappings.gate_up_rows(architecture)
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


def _layers(mapping: TensorMapping, architecture: ModelArchitecture) -> range:
    return range(architecture.num_layers) if mappings.is_layer_mapping(mapping) else range(1)
