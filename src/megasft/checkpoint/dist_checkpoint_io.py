"""megatron-core `dist_checkpointing` checkpoints, written and read one tensor chunk at a time.

A megatron-core checkpoint in the `torch_dist` format is a PyTorch Distributed Checkpoint
(DCP) directory (`.metadata` plus `*.distcp` data files) with two megatron-core files beside
it: `metadata.json` (which backend wrote the checkpoint) and `common.pt` (state that is not
sharded; empty for model weights). Every sharded tensor is stored under its *sharded key*
with its global shape, as chunks; the transformer layers of a `GPTModel` are stacked into one
tensor per parameter with the layer as the leading axis (`decoder.layers.mlp.linear_fc2.weight`
has shape [num_layers, hidden, ffn]), one chunk per layer. Because the global shapes do not
depend on the parallel layout, megatron-core loads such a checkpoint at any TP/PP.

`dist_checkpointing.save` needs the whole state dict in memory. The writer here instead hands
DCP a plan of chunks and produces each chunk only when DCP writes it, so converting a model
holds one chunk at a time. Each chunk goes to its own `.distcp` file: DCP keeps every tensor
of a file alive until the file is closed, and a chunk alone in its file can be read back
memory-mapped, without a copy. The reader reads any region of a stored tensor: a region that
is exactly such a chunk is mapped, anything else is assembled by DCP from whichever chunks
overlap it, so checkpoints that megatron-core wrote itself at TP>1 (the trainer's) read too.
Tests load these checkpoints with megatron-core's own `dist_checkpointing.load` at TP=1 and
TP=2, and export checkpoints that megatron-core saved at TP=2.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megasft.checkpoint.errors import CheckpointError

MEGATRON_METADATA_FILE = "metadata.json"
MEGATRON_COMMON_FILE = "common.pt"
DCP_METADATA_FILE = ".metadata"

# What megatron-core's `dist_checkpointing.save` records for the `torch_dist` backend
# (megatron.core.dist_checkpointing.core.CheckpointingConfig); `dist_checkpointing.load`
# picks its load strategy from this file.
MEGATRON_CHECKPOINT_CONFIG = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


@dataclass(frozen=True)
class ChunkToWrite:
    """One chunk of a sharded tensor, produced on demand.

    `offsets` and `shape` place the chunk inside the tensor of `global_shape`; for a layer of
    a stacked parameter that is offsets (layer, 0, ...) and shape (1, *parameter_shape).
    """

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]


def write_dist_checkpoint(directory: Path, chunks: Sequence[ChunkToWrite]) -> None:
    """Write `chunks` as a megatron-core `torch_dist` checkpoint into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    # No fsync per file, like `save_pretrained`: the caller renames the directory into place
    # once everything is written, which is what protects against a half-written target.
    writer = dcp.FileSystemWriter(
        directory, single_file_per_rank=False, thread_count=1, sync_files=False
    )
    with _single_process_is_intended():
        dcp.save({}, storage_writer=writer, planner=_LazySavePlanner(chunks), no_dist=True)
    (directory / MEGATRON_METADATA_FILE).write_text(json.dumps(MEGATRON_CHECKPOINT_CONFIG))
    torch.save({}, directory / MEGATRON_COMMON_FILE)


class _LazySavePlanner(DefaultSavePlanner):
    """Plans the given chunks and produces each one only when DCP writes it."""

    def __init__(self, chunks: Sequence[ChunkToWrite]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {(chunk.key, chunk.offsets): chunk for chunk in chunks}
        if len(self._chunks) != len(chunks):
            raise ValueError("two chunks share a key and offsets")

    def create_local_plan(self) -> SavePlan:
        items = [
            WriteItem(
                index=MetadataIndex(chunk.key, torch.Size(chunk.offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(torch.Size(chunk.offsets), torch.Size(chunk.shape)),
                    properties=TensorProperties(dtype=chunk.dtype),
                    size=torch.Size(chunk.global_shape),
                ),
            )
            for chunk in self._chunks.values()
        ]
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        chunk = self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        tensor = chunk.produce()
        if tuple(tensor.shape) != chunk.shape or tensor.dtype != chunk.dtype:
            raise CheckpointError(
                f"{chunk.key} at {chunk.offsets}: produced {tuple(tensor.shape)} {tensor.dtype}, "
                f"planned {chunk.shape} {chunk.dtype}"
            )
        return tensor.contiguous()


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as recorded in a checkpoint's metadata."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class DistCheckpointReader:
    """Reads regions of the tensors of a megatron-core `torch_dist` checkpoint."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._check_is_megatron_checkpoint()
        self._storage_reader = dcp.FileSystemReader(self.directory)
        try:
            self._metadata: Metadata = self._storage_reader.read_metadata()
        except Exception as error:  # a torn pickle raises many types; all mean "unreadable"
            raise CheckpointError(
                f"{self.directory / DCP_METADATA_FILE}: unreadable checkpoint metadata ({error})"
            ) from error
        self.tensors: dict[str, StoredTensor] = {
            key: StoredTensor(key, tuple(entry.size), entry.properties.dtype)
            for key, entry in self._metadata.state_dict_metadata.items()
            if isinstance(entry, TensorStorageMetadata)
        }

    def _check_is_megatron_checkpoint(self) -> None:
        config_file = self.directory / MEGATRON_METADATA_FILE
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(
                f"{self.directory}: not a megatron-core dist_checkpointing checkpoint "
                f"({MEGATRON_METADATA_FILE} missing or unreadable)"
            ) from error
        if config.get("sharded_backend") != "torch_dist":
            raise CheckpointError(
                f"{config_file}: sharded_backend is {config.get('sharded_backend')!r}; only "
                "'torch_dist' checkpoints can be converted (re-save with ckpt-format torch_dist)"
            )

    def read(self, key: str, offsets: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        """The region of tensor `key` starting at `offsets`, of `shape`."""
        stored = self.tensors.get(key)
        if stored is None:
            raise CheckpointError(f"{self.directory}: the checkpoint has no tensor {key!r}")
        if len(offsets) != len(stored.shape) or any(
            offset + size > bound
            for offset, size, bound in zip(offsets, shape, stored.shape, strict=True)
        ):
            raise CheckpointError(
                f"{self.directory}: region {offsets}+{shape} lies outside {key!r} of shape "
                f"{stored.shape}"
            )
        tensor = self._read_stored_chunk(key, offsets, shape)
        if tensor is None:
            tensor = self._read_resharded(key, offsets, shape)
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != stored.dtype:
            raise CheckpointError(
                f"{self.directory}: {key!r} at {offsets} holds {tuple(tensor.shape)} "
                f"{tensor.dtype}, the metadata says {tuple(shape)} {stored.dtype}"
            )
        return tensor

    def _read_stored_chunk(
        self, key: str, offsets: tuple[int, ...], shape: tuple[int, ...]
    ) -> torch.Tensor | None:
        """The region, memory-mapped without a copy, when it is exactly one stored chunk
        alone in its file (as this module writes them); else None."""
        entry = self._metadata.state_dict_metadata[key]
        if not any(
            tuple(chunk.offsets) == tuple(offsets) and tuple(chunk.sizes) == tuple(shape)
            for chunk in entry.chunks
        ):
            return None
        info = (self._metadata.storage_data or {}).get(MetadataIndex(key, torch.Size(offsets)))
        path = self.directory / str(getattr(info, "relative_path", ""))
        whole_file = (
            getattr(info, "offset", None) == 0
            and not getattr(info, "transform_descriptors", None)
            and path.is_file()
            and getattr(info, "length", None) == path.stat().st_size
        )
        if not whole_file:
            return None
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as error:  # a torn file raises many types; all mean "unreadable"
            raise CheckpointError(
                f"{path}: unreadable ({error}); the checkpoint is damaged"
            ) from error

    def _read_resharded(
        self, key: str, offsets: tuple[int, ...], shape: tuple[int, ...]
    ) -> torch.Tensor:
        """The region assembled by DCP from whichever stored chunks overlap it."""
        target = torch.empty(shape, dtype=self.tensors[key].dtype)
        planner = _RegionLoadPlanner({key: (offsets, shape)})
        with _single_process_is_intended():
            dcp.load(
                {key: target}, storage_reader=self._storage_reader, planner=planner, no_dist=True
            )
        if planner.covered_elements[key] != math.prod(shape):
            raise CheckpointError(
                f"{self.directory}: the stored chunks of {key!r} do not cover region "
                f"{offsets}+{shape}; the checkpoint is incomplete"
            )
        return target


class _RegionLoadPlanner(DefaultLoadPlanner):
    """Loads one region of each requested tensor, from however the tensor was chunked."""

    def __init__(self, regions: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._regions = regions
        self.covered_elements: dict[str, int] = dict.fromkeys(regions, 0)

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        items = []
        for key, (offsets, shape) in self._regions.items():
            region = ChunkStorageMetadata(torch.Size(offsets), torch.Size(shape))
            stored = self.metadata.state_dict_metadata[key]
            for item in create_read_items_for_chunk_list(key, stored, [region]):
                self.covered_elements[key] += math.prod(item.lengths)
                items.append(item)
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        # The target holds exactly the region, so read items are placed relative to it.
        return self.state_dict[index.fqn]


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """Run a one-process DCP save or load: silence DCP's warning that torch.distributed is
    not initialised (conversion runs in one process on purpose), and re-raise the original
    error of a failed chunk rather than DCP's per-rank wrapper around it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            yield
        except CheckpointException as error:
            for failure in error.failures.values():
                original = failure[0] if isinstance(failure, tuple) else failure
                if isinstance(original, BaseException):
                    raise original from None
            raise
