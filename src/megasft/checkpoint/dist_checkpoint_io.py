"""megatron-core `dist_checkpointing` checkpoints, written and read one tensor chunk at a time.

The writer lays a `torch_dist` checkpoint out as DCP's `FileSystemWriter` does for one process
(one `torch.save` file per chunk, then `.metadata`), copying each chunk's bytes from its
sources: no tensor is built, neither torch nor DCP is imported. The reader returns any region
of a stored tensor as byte sources, located in its chunk's file where it is contiguous, else
assembled by DCP's resharding reader. See docs/convert.md, "The files, written without torch".
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from megasft.checkpoint.dcp_metadata import (
    DCP_METADATA_FILE,
    StoredChunk,
    StoredTensor,
    UnknownMetadata,
    metadata_from_dcp,
    read_metadata,
    write_metadata,
)
from megasft.checkpoint.errors import CheckpointError
from megasft.checkpoint.tensor_bytes import DTYPES, ByteSource, byte_count, total_length
from megasft.checkpoint.torch_save_format import (
    NotAPlainTensor,
    PlainTensor,
    locate_tensor,
    write_empty_dict_file,
    write_tensor_file,
)

if TYPE_CHECKING:
    from megasft.checkpoint.dist_checkpoint_resharding import ReshardingReader

MEGATRON_METADATA_FILE = "metadata.json"
MEGATRON_COMMON_FILE = "common.pt"

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
    `produce()` returns the chunk's bytes in row-major order, when the chunk is written.
    """

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str
    """A safetensors dtype name, e.g. "BF16"."""
    produce: Callable[[], Sequence[ByteSource]]


def write_dist_checkpoint(directory: Path, chunks: Sequence[ChunkToWrite]) -> None:
    """Write `chunks` as a megatron-core `torch_dist` checkpoint into `directory`.

    Args:
        directory: the checkpoint directory (created if missing).
        chunks: every chunk of every tensor, each producing its bytes when written.

    Raises:
        CheckpointError: the chunks do not tile their tensors, or a chunk produced other than
            its planned number of bytes.
    """
    tensors = _check_plan(chunks)
    directory.mkdir(parents=True, exist_ok=True)
    # No fsync per file, like `save_pretrained`: the caller renames the directory into place
    # once everything is written, which is what protects against a half-written target.
    stored: dict[str, list[StoredChunk]] = {key: [] for key in tensors}
    for number, chunk in enumerate(chunks):
        file_name = f"__0_{number}.distcp"  # DCP's names: rank 0, then a counter
        sources = chunk.produce()
        if total_length(sources) != byte_count(chunk.shape, chunk.dtype):
            raise CheckpointError(
                f"{chunk.key} at {chunk.offsets}: produced {total_length(sources)} bytes, "
                f"planned {chunk.shape} {chunk.dtype} ({byte_count(chunk.shape, chunk.dtype)} "
                "bytes)"
            )
        length = write_tensor_file(directory / file_name, chunk.dtype, chunk.shape, sources)
        stored[chunk.key].append(StoredChunk(chunk.offsets, chunk.shape, file_name, 0, length))
    write_metadata(
        directory / DCP_METADATA_FILE,
        [
            StoredTensor(key, shape, dtype, tuple(stored[key]))
            for key, (shape, dtype) in tensors.items()
        ],
        checkpoint_id=str(directory),
    )
    (directory / MEGATRON_METADATA_FILE).write_text(json.dumps(MEGATRON_CHECKPOINT_CONFIG))
    write_empty_dict_file(directory / MEGATRON_COMMON_FILE)


def _check_plan(chunks: Sequence[ChunkToWrite]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each tensor's (global shape, dtype), after checking that its chunks agree on them, lie
    inside it and fill it exactly."""
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    covered: dict[str, int] = {}
    seen: set[tuple[str, tuple[int, ...]]] = set()
    for chunk in chunks:
        where = f"{chunk.key} at {chunk.offsets}"
        if tensors.setdefault(chunk.key, (chunk.global_shape, chunk.dtype)) != (
            chunk.global_shape,
            chunk.dtype,
        ):
            raise ValueError(f"{where}: chunks of one tensor disagree on its shape or dtype")
        if (chunk.key, chunk.offsets) in seen:
            raise ValueError(f"{where}: two chunks share a key and offsets")
        seen.add((chunk.key, chunk.offsets))
        if len(chunk.offsets) != len(chunk.global_shape) or any(
            offset < 0 or offset + size > bound
            for offset, size, bound in zip(
                chunk.offsets, chunk.shape, chunk.global_shape, strict=True
            )
        ):
            raise ValueError(f"{where}: {chunk.shape} lies outside {chunk.global_shape}")
        covered[chunk.key] = covered.get(chunk.key, 0) + math.prod(chunk.shape)
    for key, (shape, _) in tensors.items():
        if covered[key] != math.prod(shape):
            raise ValueError(
                f"{key}: the chunks cover {covered[key]} of {math.prod(shape)} elements"
            )
    return tensors


class DistCheckpointReader:
    """Reads regions of the tensors of a megatron-core `torch_dist` checkpoint."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._check_is_megatron_checkpoint()
        self._resharding_reader: ReshardingReader | None = None
        metadata_file = self.directory / DCP_METADATA_FILE
        try:
            try:
                tensors = read_metadata(metadata_file)
            except UnknownMetadata:
                tensors = metadata_from_dcp(self._resharding().metadata)
        except Exception as error:  # a torn pickle raises many types; all mean "unreadable"
            raise CheckpointError(
                f"{metadata_file}: unreadable checkpoint metadata ({error})"
            ) from error
        self.tensors: dict[str, StoredTensor] = {tensor.key: tensor for tensor in tensors}
        self._archives: dict[tuple[str, int], PlainTensor | None] = {}
        self._last_resharded: tuple[tuple, ByteSource] | None = None

    def _resharding(self) -> ReshardingReader:
        """DCP's own reader, made (importing torch and DCP) only when a region needs it."""
        if self._resharding_reader is None:
            from megasft.checkpoint.dist_checkpoint_resharding import ReshardingReader

            self._resharding_reader = ReshardingReader(self.directory)
        return self._resharding_reader

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

    def read(self, key: str, offsets: tuple[int, ...], shape: tuple[int, ...]) -> ByteSource:
        """The bytes of the region of tensor `key` starting at `offsets`, of `shape`.

        Args:
            key: the tensor's sharded key.
            offsets: where the region starts, per axis.
            shape: the region's shape.

        Returns:
            The region's bytes (row-major), located in a chunk's file where possible.

        Raises:
            CheckpointError: no such tensor, an unsupported dtype, a region outside the tensor,
                or stored bytes that disagree with the metadata.
        """
        stored = self.tensors.get(key)
        if stored is None:
            raise CheckpointError(f"{self.directory}: the checkpoint has no tensor {key!r}")
        if stored.dtype not in DTYPES:
            raise CheckpointError(
                f"{self.directory}: {key!r} has dtype {stored.dtype}, which megasft does not "
                f"convert (supported: {', '.join(dtype.torch_name for dtype in DTYPES.values())})"
            )
        if len(offsets) != len(stored.shape) or any(
            offset + size > bound
            for offset, size, bound in zip(offsets, shape, stored.shape, strict=True)
        ):
            raise CheckpointError(
                f"{self.directory}: region {offsets}+{shape} lies outside {key!r} of shape "
                f"{stored.shape}"
            )
        source = self._read_from_one_chunk(stored, offsets, shape)
        if source is None:
            source = self._read_resharded(stored, offsets, shape)
        if source.length != byte_count(shape, stored.dtype):
            raise CheckpointError(
                f"{self.directory}: {key!r} at {offsets} holds {source.length} bytes, the "
                f"metadata says {tuple(shape)} {stored.dtype}"
            )
        return source

    def _read_from_one_chunk(
        self, stored: StoredTensor, offsets: tuple[int, ...], shape: tuple[int, ...]
    ) -> ByteSource | None:
        """The region's bytes in the file, when it is a contiguous block of one stored chunk
        that is a plain `torch.save` archive; else None."""
        for chunk in stored.chunks:
            start = _contiguous_block_start(chunk, offsets, shape)
            if start is None or chunk.transformed:
                continue
            tensor = self._locate(stored, chunk)
            if tensor is None:
                return None
            itemsize = DTYPES[stored.dtype].itemsize
            return tensor.data.slice(start * itemsize, math.prod(shape) * itemsize)
        return None

    def _locate(self, stored: StoredTensor, chunk: StoredChunk) -> PlainTensor | None:
        """The chunk's tensor in its archive (None when the archive is not a plain one)."""
        if (chunk.file, chunk.file_offset) not in self._archives:
            path = self.directory / chunk.file
            try:
                file_size = path.stat().st_size
            except OSError as error:
                raise CheckpointError(
                    f"{path}: unreadable ({error}); the checkpoint is incomplete"
                ) from error
            if chunk.file_offset + chunk.length > file_size:
                raise CheckpointError(
                    f"{path}: {file_size} bytes, but the metadata places {stored.key!r} up to "
                    f"byte {chunk.file_offset + chunk.length}; the checkpoint is damaged"
                )
            try:
                tensor = locate_tensor(path, chunk.file_offset, chunk.length)
            except NotAPlainTensor:
                tensor = None
            if tensor is not None and (tensor.shape, tensor.dtype) != (chunk.sizes, stored.dtype):
                tensor = None
            self._archives[(chunk.file, chunk.file_offset)] = tensor
        return self._archives[(chunk.file, chunk.file_offset)]

    def _read_resharded(
        self, stored: StoredTensor, offsets: tuple[int, ...], shape: tuple[int, ...]
    ) -> ByteSource:
        """The region assembled by DCP from whichever stored chunks overlap it. The last one
        is kept: the three HF tensors of a fused QKV are read from one region in turn."""
        region = (stored.key, offsets, shape)
        if self._last_resharded is None or self._last_resharded[0] != region:
            self._last_resharded = None  # free the previous region before reading the next
            source = self._resharding().read(
                stored.key, DTYPES[stored.dtype].torch_name, offsets, shape
            )
            self._last_resharded = (region, source)
        return self._last_resharded[1]


def _contiguous_block_start(
    chunk: StoredChunk, offsets: Sequence[int], shape: Sequence[int]
) -> int | None:
    """The element offset of the region in the chunk, when the region lies inside the chunk
    and is one contiguous run of its row-major elements; else None.

    That is when, after the first axis where the region spans more than one index, it spans
    every index of every axis (e.g. a block of whole rows)."""
    relative = [
        offset - chunk_offset for offset, chunk_offset in zip(offsets, chunk.offsets, strict=True)
    ]
    if any(
        start < 0 or start + size > bound
        for start, size, bound in zip(relative, shape, chunk.sizes, strict=True)
    ):
        return None
    spanning = next((axis for axis, size in enumerate(shape) if size > 1), len(shape))
    if any(shape[axis] != chunk.sizes[axis] for axis in range(spanning + 1, len(shape))):
        return None
    start = 0
    for position, size in zip(relative, chunk.sizes, strict=True):
        start = start * size + position
    return start
