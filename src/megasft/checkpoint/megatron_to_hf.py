"""megatron-core `dist_checkpointing` checkpoint -> Hugging Face model directory.

The inverse of `hf_to_megatron`: every HF tensor is planned (name, shape, dtype) from the
checkpoint metadata and the family's mapping table, checked, then copied one at a time while
the safetensors shards are written. Each HF tensor is its own rows of the megatron tensor
(gate and up are two row ranges of fc1; the vocabulary padding is never read); q, k and v
are the blocks of the fused QKV that `mappings.qkv_blocks` assigns to each.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megasft.checkpoint import mappings
from megasft.checkpoint.dist_checkpoint_io import DistCheckpointReader
from megasft.checkpoint.errors import CheckpointError
from megasft.checkpoint.layout import (
    ARCHITECTURE_FILE,
    GENERATION_CONFIG_FILE,
    HF_CONFIG_FILE,
    HF_FILES_DIR,
    TOKENIZER_FILES,
    copy_hf_metadata_files,
)
from megasft.checkpoint.safetensors_io import TensorToWrite, write_hf_weights
from megasft.checkpoint.tensor_bytes import DTYPES, ByteSource, byte_count
from megasft.errors import ConfigError
from megasft.megatron.architecture import (
    ModelArchitecture,
    architecture_from_hf_config,
    hf_config_from_architecture,
    read_hf_config,
)
from megasft.megatron.families.weight_mapping import (
    EMBEDDING,
    ExpertsGateUp,
    FusedGateUp,
    FusedQKV,
    TensorMapping,
)

logger = logging.getLogger(__name__)


def convert_megatron_to_hf(
    source: Path, destination: Path, *, base: Path | None = None, max_shard_bytes: int
) -> ModelArchitecture:
    """Write the HF model of the megatron checkpoint in `source` into `destination`.

    config.json, generation_config.json and the tokenizer come from `base` when given (its
    architecture must match the checkpoint's), else from the copies stored at import."""
    architecture = _read_architecture(source)
    reader = DistCheckpointReader(source)
    table = mappings.mappings_for(architecture)
    tensors = plan_hf_tensors(reader, architecture, table)

    metadata_source = Path(base) if base is not None else source / HF_FILES_DIR
    if base is not None:
        _check_base_matches(base, architecture)
    write_hf_weights(destination, tensors, max_shard_bytes=max_shard_bytes)
    _write_hf_metadata(metadata_source, destination, architecture, tensors[0].dtype)
    return architecture


def _read_architecture(source: Path) -> ModelArchitecture:
    path = source / ARCHITECTURE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{source}: no {ARCHITECTURE_FILE}; not a megasft megatron checkpoint (create one "
            "with `megasft convert --from hf --to megatron`)"
        )
    try:
        return ModelArchitecture.load(path)
    except ConfigError as error:
        raise CheckpointError(str(error)) from error


def plan_hf_tensors(
    reader: DistCheckpointReader, architecture: ModelArchitecture, table: tuple[TensorMapping, ...]
) -> list[TensorToWrite]:
    """Every HF tensor in HF order (embedding, layers, norm, output), each produced on demand.

    Checks first that the checkpoint holds every tensor of the table with the shape the
    architecture implies, so a checkpoint of another family or size is refused before writing.
    """
    for mapping in table:
        for layer in mappings.layers_of(mapping, architecture):
            _check_stored_shape(
                reader, architecture, mappings.placement(mapping, architecture, layer)
            )
    layer_table = [mapping for mapping in table if mappings.is_layer_mapping(mapping)]
    global_table = {mapping.megatron: mapping for mapping in table if mapping not in layer_table}

    tensors = _hf_tensors(global_table.pop(EMBEDDING), architecture, reader, None)
    for layer in range(architecture.num_layers):
        for mapping in layer_table:
            if layer in mappings.layers_of(mapping, architecture):
                tensors += _hf_tensors(mapping, architecture, reader, layer)
    for mapping in global_table.values():
        tensors += _hf_tensors(mapping, architecture, reader, None)
    return tensors


def _hf_tensors(
    mapping: TensorMapping,
    architecture: ModelArchitecture,
    reader: DistCheckpointReader,
    layer: int | None,
) -> list[TensorToWrite]:
    """The HF tensors of one mapping (of one layer; of each expert, for experts), each reading
    only its own rows."""
    place = mappings.placement(mapping, architecture, layer)
    dtype = reader.tensors[place.key].dtype
    shapes = mappings.hf_shapes(mapping, architecture)
    tensors = []
    for expert in mappings.experts_of(mapping, architecture):
        # An expert's tensor is the stacked tensor's block at (layer, expert).
        index = place.index if expert is None else (*place.index, expert)
        names = [mappings.hf_name(name, layer, expert) for name in mapping.hf_names]
        if isinstance(mapping, FusedQKV):
            producers = [
                _qkv_part(reader, architecture, place.key, index, part) for part in range(3)
            ]
        elif isinstance(mapping, FusedGateUp | ExpertsGateUp):
            producers = [
                _rows(reader, place.key, index, rows)
                for rows in mappings.gate_up_rows(architecture, mapping)
            ]
        else:
            # Vocabulary-padded tensors: only the HF rows, the padding is left behind.
            producers = [_rows(reader, place.key, index, slice(0, shapes[0][0]))]
        tensors += [
            TensorToWrite(name, shape, dtype, produce)
            for name, shape, produce in zip(names, shapes, producers, strict=True)
        ]
    return tensors


def _rows(
    reader: DistCheckpointReader, key: str, index: tuple[int, ...], rows: slice
) -> Callable[[], list[ByteSource]]:
    """Reads rows `rows` of the tensor at `index` (its offsets on the leading axes: layer,
    expert) of checkpoint tensor `key`."""

    def produce() -> list[ByteSource]:
        stored_shape = reader.tensors[key].shape
        trailing = stored_shape[len(index) + 1 :]
        # [1, ..., rows, ...] at (*index, first row, 0, ...): the same bytes as [rows, ...]
        offsets = (*index, rows.start, *(0,) * len(trailing))
        shape = (*(1,) * len(index), rows.stop - rows.start, *trailing)
        return [reader.read(key, offsets, shape)]

    return produce


def _qkv_part(
    reader: DistCheckpointReader,
    architecture: ModelArchitecture,
    key: str,
    index: tuple[int, ...],
    part: int,
) -> Callable[[], list[ByteSource]]:
    """Reads HF q, k or v (`part` 0, 1, 2): its blocks of the fused QKV, in order."""

    def produce() -> list[ByteSource]:
        stored = reader.tensors[key]
        fused_rows = stored.shape[len(index)]
        (fused,) = _rows(reader, key, index, slice(0, fused_rows))()
        row_bytes = byte_count(stored.shape[len(index) + 1 :], stored.dtype)  # weight; bias
        return [
            fused.slice(block.fused_first_row * row_bytes, block.rows * row_bytes)
            for block in mappings.qkv_blocks(architecture)
            if block.part == part
        ]

    return produce


def _check_stored_shape(
    reader: DistCheckpointReader, architecture: ModelArchitecture, place: mappings.Placement
) -> None:
    stored = reader.tensors.get(place.key)
    if stored is None:
        raise CheckpointError(
            f"{reader.directory}: no tensor {place.key!r}, which a {architecture.family} model "
            f"needs; the checkpoint does not match its {ARCHITECTURE_FILE}"
        )
    if stored.shape != place.global_shape:
        raise CheckpointError(
            f"{reader.directory}: {place.key!r} has shape {list(stored.shape)}, but "
            f"{ARCHITECTURE_FILE} implies {list(place.global_shape)}"
        )
    if stored.dtype not in DTYPES:
        raise CheckpointError(
            f"{reader.directory}: {place.key!r} has dtype {stored.dtype}, which safetensors "
            "conversion does not support"
        )


def _check_base_matches(base: Path, architecture: ModelArchitecture) -> None:
    base_architecture = architecture_from_hf_config(
        read_hf_config(base), str(base / HF_CONFIG_FILE)
    )
    if base_architecture != architecture:
        differences = [
            f"{field}: checkpoint {getattr(architecture, field)!r}, base {getattr(base_architecture, field)!r}"
            for field in architecture.__dataclass_fields__
            if getattr(architecture, field) != getattr(base_architecture, field)
        ]
        raise CheckpointError(
            f"{base}: --base describes another model than the checkpoint ({'; '.join(differences)}); "
            "pass the HF model the checkpoint was converted from"
        )


def _write_hf_metadata(
    source: Path, destination: Path, architecture: ModelArchitecture, dtype: str
) -> None:
    copied = copy_hf_metadata_files(source, destination) if source.is_dir() else []
    if HF_CONFIG_FILE not in copied:
        logger.warning("%s: no config.json; writing one from %s", source, ARCHITECTURE_FILE)
        config = hf_config_from_architecture(architecture)
        config["torch_dtype"] = DTYPES[dtype].torch_name
        (destination / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if GENERATION_CONFIG_FILE not in copied:
        (destination / GENERATION_CONFIG_FILE).write_text(
            json.dumps(_generation_config(read_hf_config(destination)), indent=2) + "\n"
        )
    if not any(name in copied for name in TOKENIZER_FILES):
        logger.warning(
            "%s: no tokenizer files; the HF model is written without a tokenizer "
            "(pass --base with the original HF model to include it)",
            source,
        )


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    """The generation config transformers derives from a model config: its special token ids."""
    generation_config: dict[str, Any] = {}
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(field) is not None:
            generation_config[field] = config[field]
    return generation_config
