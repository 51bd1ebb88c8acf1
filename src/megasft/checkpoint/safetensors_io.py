"""Hugging Face weight files: reading tensors as byte ranges, sharded writing.

Reading hands out every tensor as the byte range it occupies in its file, without loading it or
importing torch (`pytorch_model.bin` is the exception); writing puts each shard's bytes out
front to back, copied from their sources. The layout and why: docs/convert.md, "The files,
written without torch".
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from megasft.checkpoint.errors import CheckpointError
from megasft.checkpoint.tensor_bytes import (
    DTYPES,
    DTYPES_BY_TORCH_NAME,
    ByteSource,
    FileBytes,
    MemoryBytes,
    byte_count,
    copy_bytes,
    total_length,
)

if TYPE_CHECKING:
    import torch

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PYTORCH_BIN_FILE = "pytorch_model.bin"
PYTORCH_BIN_INDEX_FILE = "pytorch_model.bin.index.json"
_MAX_HEADER_BYTES = 100 * 2**20
"""The largest safetensors header the safetensors library itself accepts."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a Hugging Face checkpoint lives, and what it is."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str
    """The safetensors dtype name, e.g. "BF16"."""
    data: FileBytes | None
    """Its bytes in a safetensors file; None in a pytorch_model.bin."""


class HFWeightsReader:
    """Reads the weights of a Hugging Face model directory, one tensor at a time.

    Accepts `model.safetensors`, sharded safetensors with `model.safetensors.index.json`, and,
    only when `allow_pytorch_bin` is set, `pytorch_model.bin` (sharded or not) loaded with
    `torch.load(weights_only=True)`. Shapes and dtypes are read from the file headers, so the
    whole checkpoint can be validated before any tensor data is read.
    """

    def __init__(self, directory: Path, *, allow_pytorch_bin: bool = False) -> None:
        self.directory = Path(directory)
        self._bin_state: tuple[Path, dict[str, torch.Tensor]] | None = None
        files = _weight_files(self.directory, allow_pytorch_bin=allow_pytorch_bin)
        self.tensors: dict[str, TensorInfo] = {}
        for file, expected_names in files.items():
            for info in _read_header(file):
                if expected_names is not None and info.name not in expected_names:
                    continue
                self.tensors[info.name] = info
        _check_index_complete(self.directory, files, self.tensors)

    def read(self, name: str) -> ByteSource:
        """The bytes of the tensor called `name` (row-major).

        Args:
            name: the tensor's HF name.

        Returns:
            Its bytes: a byte range of its safetensors file, or memory for a `pytorch_model.bin`.

        Raises:
            CheckpointError: the weights hold no tensor of that name.
        """
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.directory}: no tensor named {name!r} in the weights")
        if info.data is not None:
            return info.data
        return self._read_bin(info)

    def _read_bin(self, info: TensorInfo) -> MemoryBytes:
        import torch

        # A .bin shard is one pickle; keep the last one open (memory-mapped) while its
        # tensors are read, in file order.
        if self._bin_state is None or self._bin_state[0] != info.file:
            self._bin_state = (info.file, _load_bin(info.file))
        tensor = self._bin_state[1][info.name]
        array = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()  # [bytes], no copy
        return MemoryBytes(memoryview(array), owner=array)


def _weight_files(directory: Path, *, allow_pytorch_bin: bool) -> dict[Path, set[str] | None]:
    """Weight files to read, each with the tensor names the index assigns to it (or None)."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    index_file = directory / SAFETENSORS_INDEX_FILE
    if index_file.is_file():
        return _files_from_index(index_file)
    single_file = directory / SAFETENSORS_FILE
    if single_file.is_file():
        return {single_file: None}
    other_safetensors = sorted(directory.glob("*.safetensors"))
    if other_safetensors:
        return {path: None for path in other_safetensors}
    bin_index = directory / PYTORCH_BIN_INDEX_FILE
    bin_file = directory / PYTORCH_BIN_FILE
    if bin_index.is_file() or bin_file.is_file():
        if not allow_pytorch_bin:
            raise CheckpointError(
                f"{directory}: has only PyTorch pickle weights ({PYTORCH_BIN_FILE}); these are "
                "read only on request because a pickle can run code. Convert them to "
                "safetensors, or pass --allow-pytorch-bin to load them with "
                "torch.load(weights_only=True)"
            )
        return _files_from_index(bin_index) if bin_index.is_file() else {bin_file: None}
    raise CheckpointError(
        f"{directory}: no weights found (expected {SAFETENSORS_FILE}, or shards listed in "
        f"{SAFETENSORS_INDEX_FILE})"
    )


def _files_from_index(index_file: Path) -> dict[Path, set[str] | None]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{index_file}: not a valid index (expected a JSON object with a 'weight_map')"
        ) from error
    files: dict[Path, set[str] | None] = {}
    for name, file_name in weight_map.items():
        path = index_file.parent / file_name
        if not path.is_file():
            raise CheckpointError(
                f"{index_file}: shard {file_name!r} (holding {name!r}) is missing; "
                "download the complete checkpoint"
            )
        names = files.setdefault(path, set())
        assert names is not None
        names.add(name)
    return files


def _check_index_complete(
    directory: Path, files: dict[Path, set[str] | None], tensors: dict[str, TensorInfo]
) -> None:
    for file, expected_names in files.items():
        missing = sorted((expected_names or set()) - tensors.keys())
        if missing:
            raise CheckpointError(
                f"{file}: the index lists {len(missing)} tensor(s) that this shard does not "
                f"hold, e.g. {missing[0]!r}; the shard is from another checkpoint or corrupt"
            )


def _read_header(file: Path) -> list[TensorInfo]:
    if file.suffix == ".bin":
        infos = []
        for name, tensor in _load_bin(file).items():
            dtype = DTYPES_BY_TORCH_NAME.get(str(tensor.dtype).removeprefix("torch."))
            if dtype is None:
                raise CheckpointError(
                    f"{file}: tensor {name!r} has unsupported dtype {tensor.dtype}"
                )
            infos.append(TensorInfo(name, file, tuple(tensor.shape), dtype.safetensors_name, None))
        return infos
    try:
        return _read_safetensors_header(file)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({error}); it is truncated or corrupt, "
            "download it again"
        ) from error


def _read_safetensors_header(file: Path) -> list[TensorInfo]:
    """The tensors of a safetensors file, checked as the safetensors library checks them:
    known dtypes, each tensor's byte range as long as its shape needs, and the ranges laid
    end to end from the header to the end of the file."""
    with open(file, "rb") as stream:
        file_size = os.fstat(stream.fileno()).st_size
        header_size = int.from_bytes(stream.read(8), "little")
        if file_size < 8 or header_size > min(file_size - 8, _MAX_HEADER_BYTES):
            raise ValueError(f"a {header_size}-byte header in a {file_size}-byte file")
        header = json.loads(stream.read(header_size))
    data_start = 8 + header_size
    infos = []
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype_name not in DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {dtype_name}")
        if not all(isinstance(size, int) and size >= 0 for size in shape):
            raise ValueError(f"tensor {name!r} has shape {shape}")
        if end - begin != byte_count(shape, dtype_name):
            raise ValueError(f"tensor {name!r} has {end - begin} bytes for shape {shape}")
        ranges.append((begin, end))
        data = FileBytes(file, data_start + begin, end - begin)
        infos.append(TensorInfo(name, file, tuple(shape), dtype_name, data))
    position = 0
    for begin, end in sorted(ranges):
        if begin != position:
            raise ValueError(f"tensor data at byte {begin} where {position} was expected")
        position = end
    if data_start + position != file_size:
        raise ValueError(f"{file_size} bytes, the header describes {data_start + position}")
    return infos


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types here; all mean "unusable file"
        raise CheckpointError(
            f"{file}: cannot be loaded with torch.load(weights_only=True): {error}"
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors")
    return state


# --- writing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorToWrite:
    """One tensor of the output; `produce()` returns its bytes (row-major) when they are due."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    """A safetensors dtype name, e.g. "BF16"."""
    produce: Callable[[], Sequence[ByteSource]]

    @property
    def byte_count(self) -> int:
        """The tensor's size in bytes."""
        return byte_count(self.shape, self.dtype)


def plan_shards(
    tensors: Sequence[TensorToWrite], max_shard_bytes: int
) -> list[list[TensorToWrite]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a bigger tensor gets
    a shard of its own).

    Args:
        tensors: the tensors, in the order they are written.
        max_shard_bytes: the most bytes of one shard.

    Returns:
        The shards, each a list of tensors.
    """
    shards: list[list[TensorToWrite]] = [[]]
    shard_bytes = 0
    for tensor in tensors:
        if shards[-1] and shard_bytes + tensor.byte_count > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(tensor)
        shard_bytes += tensor.byte_count
    return shards


def write_hf_weights(
    directory: Path, tensors: Sequence[TensorToWrite], *, max_shard_bytes: int
) -> list[Path]:
    """Write `tensors` as `model.safetensors`, or as `model-0000i-of-0000n.safetensors` shards
    with `model.safetensors.index.json` when they exceed `max_shard_bytes`.

    Args:
        directory: where the files go.
        tensors: the tensors, in order, each producing its bytes when written.
        max_shard_bytes: the most bytes of one shard.

    Returns:
        The files written (the index last).

    Raises:
        CheckpointError: a tensor's dtype cannot be written, or it produced other than its
            planned number of bytes.
    """
    shards = plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        path = directory / SAFETENSORS_FILE
        write_safetensors_file(path, shards[0])
        return [path]
    paths = []
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        path = directory / f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_file(path, shard)
        paths.append(path)
        weight_map.update({tensor.name: path.name for tensor in shard})
    index = {
        "metadata": {"total_size": sum(tensor.byte_count for tensor in tensors)},
        "weight_map": weight_map,
    }
    index_path = directory / SAFETENSORS_INDEX_FILE
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    return [*paths, index_path]


def write_safetensors_file(path: Path, tensors: Iterable[TensorToWrite]) -> None:
    """Write one safetensors file, producing and writing one tensor at a time.

    Args:
        path: the file to write.
        tensors: its tensors, in order.

    Raises:
        CheckpointError: a tensor's dtype cannot be written, or it produced other than its
            planned number of bytes.
        RuntimeError: the machine is not little-endian.
    """
    if sys.byteorder != "little":
        raise RuntimeError("writing safetensors needs a little-endian machine")
    tensors = list(tensors)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        if tensor.dtype not in DTYPES:
            raise CheckpointError(f"{tensor.name}: dtype {tensor.dtype} cannot be written")
        header[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.byte_count],
        }
        offset += tensor.byte_count
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb", buffering=0) as stream:
        stream.write(len(header_bytes).to_bytes(8, "little") + header_bytes)
        for tensor in tensors:
            sources = tensor.produce()
            if total_length(sources) != tensor.byte_count:
                raise CheckpointError(
                    f"{tensor.name}: produced {total_length(sources)} bytes, planned "
                    f"{tensor.shape} {tensor.dtype} ({tensor.byte_count} bytes)"
                )
            copy_bytes(stream.fileno(), sources)
