"""Hugging Face model directory -> megatron-core `dist_checkpointing` checkpoint.

Everything is validated from file headers before any tensor is read: the architecture from
config.json, then the name, shape and dtype of every weight against the family's mapping
table. Writing then streams: each megatron tensor (one layer of it) is read, fused and
written before the next is read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from megasft.checkpoint import mappings
from megasft.checkpoint.dist_checkpoint_io import ChunkToWrite, write_dist_checkpoint
from megasft.checkpoint.errors import CheckpointError
from megasft.checkpoint.layout import ARCHITECTURE_FILE, HF_FILES_DIR, copy_hf_metadata_files
from megasft.checkpoint.mappings import FusedGateUp, FusedQKV, TensorMapping
from megasft.checkpoint.safetensors_io import HFWeightsReader
from megasft.megatron.architecture import (
    ModelArchitecture,
    architecture_from_hf_config,
    read_hf_config,
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
) -> torch.dtype:
    """Check that the weights are exactly the family's tensors with the config's shapes.

    Returns their dtype. Missing tensors, extra tensors (e.g. biases of another family) and
    shape mismatches are refused here, before anything is written."""
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
            f"{directory}: weights mix dtypes {sorted(map(str, dtypes))}; megasft expects one"
        )
    return dtypes.pop()


def plan_megatron_chunks(
    weights: HFWeightsReader, architecture: ModelArchitecture, table: tuple[TensorMapping, ...]
) -> list[ChunkToWrite]:
    """One chunk per megatron tensor and layer, each produced from the HF tensors on demand."""
    chunks = []
    for mapping in table:
        shape = mappings.megatron_shape(mapping, architecture)
        dtype = weights.tensors[mapping.hf_names[0].format(layer=0)].dtype
        if mappings.is_layer_mapping(mapping):
            key = mappings.stacked_key(mapping.megatron)
            for layer in range(architecture.num_layers):
                chunks.append(
                    ChunkToWrite(
                        key=key,
                        global_shape=(architecture.num_layers, *shape),
                        offsets=(layer,) + (0,) * len(shape),
                        shape=(1, *shape),
                        dtype=dtype,
                        produce=_producer(weights, architecture, mapping, layer, stacked=True),
                    )
                )
        else:
            chunks.append(
                ChunkToWrite(
                    key=mapping.megatron,
                    global_shape=shape,
                    offsets=(0,) * len(shape),
                    shape=shape,
                    dtype=dtype,
                    produce=_producer(weights, architecture, mapping, None, stacked=False),
                )
            )
    return chunks


def _producer(
    weights: HFWeightsReader,
    architecture: ModelArchitecture,
    mapping: TensorMapping,
    layer: int | None,
    *,
    stacked: bool,
):
    def produce() -> torch.Tensor:
        sources = [weights.read(name.format(layer=layer)) for name in mapping.hf_names]
        if isinstance(mapping, FusedQKV):
            tensor = mappings.fuse_qkv(*sources, architecture)
        elif isinstance(mapping, FusedGateUp):
            tensor = mappings.fuse_gate_up(*sources)
        elif mapping.megatron in mappings.VOCAB_PADDED:
            tensor = mappings.pad_vocab(sources[0], architecture)
        else:
            tensor = sources[0]
        # A stacked layer chunk is [1, *shape]: the layer axis comes first.
        return tensor.unsqueeze(0) if stacked else tensor

    return produce


def _layers(mapping: TensorMapping, architecture: ModelArchitecture) -> range:
    return range(architecture.num_layers) if mappings.is_layer_mapping(mapping) else range(1)
