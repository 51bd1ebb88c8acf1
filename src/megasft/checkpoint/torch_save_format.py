"""The file format of `torch.save`, for one tensor, written and read without importing torch.

`write_tensor_file` writes exactly the bytes `torch.save` 2.x writes for a DCP chunk (save for
the serialization id); `locate_tensor` finds a saved tensor's bytes so that a converter can copy
them without loading them. The zip container is `torch_zip`'s; the record layout, and why torch
is not imported, are in docs/convert.md ("The files, written without torch").
"""

from __future__ import annotations

import io
import os
import pickle
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megasft.checkpoint.tensor_bytes import (
    DTYPES,
    DTYPES_BY_STORAGE_CLASS,
    ByteSource,
    FileBytes,
    byte_count,
    total_length,
)
from megasft.checkpoint.torch_zip import (
    ALIGNMENT,
    NotAPlainTensor,
    ZipWriter,
    read_directory,
    record_data,
)

STREAM_ARCHIVE_NAME = "archive"
"""The record-name prefix `torch.save` uses when writing to a stream, as DCP does (saving
to a path, it uses the file name without its extension)."""


# --- writing ---------------------------------------------------------------------------------


def write_tensor_file(
    path: Path, dtype: str, shape: Sequence[int], sources: Sequence[ByteSource]
) -> int:
    """Write the tensor of `dtype` and `shape` whose bytes are `sources` as `torch.save` would.

    Args:
        path: the new file (it must not exist).
        dtype: a safetensors dtype name, e.g. "BF16".
        shape: the tensor's shape (at least one axis).
        sources: the tensor's bytes, row-major, in order.

    Returns:
        The file's size.

    Raises:
        ValueError: a 0-dimensional tensor, or sources of the wrong total length.
        FileExistsError: `path` exists.
    """
    if not shape:
        raise ValueError(f"{path}: a 0-dimensional tensor is not supported")
    if total_length(sources) != byte_count(shape, dtype):
        raise ValueError(
            f"{path}: {total_length(sources)} bytes for a {dtype} tensor of shape "
            f"{list(shape)} ({byte_count(shape, dtype)} bytes)"
        )
    numel = byte_count(shape, dtype) // DTYPES[dtype].itemsize
    with ZipWriter(path, STREAM_ARCHIVE_NAME) as archive:
        archive.add("data.pkl", _tensor_pickle(dtype, numel, shape))
        _add_format_records(archive)
        archive.add_streamed("data/0", sources)
        _add_closing_records(archive)
        return archive.finish()


def write_empty_dict_file(path: Path) -> None:
    """Write what `torch.save({}, path)` writes (megatron-core's `common.pt` of a
    weights-only checkpoint).

    Args:
        path: the new file (it must not exist; its stem names the archive, as in torch).
    """
    with ZipWriter(path, path.stem) as archive:
        archive.add("data.pkl", b"\x80\x02}q\x00.")  # PROTO 2, EMPTY_DICT, BINPUT 0, STOP
        _add_format_records(archive)
        _add_closing_records(archive)
        archive.finish()


def _add_format_records(archive: ZipWriter) -> None:
    archive.add(".format_version", b"1")
    archive.add(".storage_alignment", str(ALIGNMENT).encode())
    archive.add("byteorder", b"little")


def _add_closing_records(archive: ZipWriter) -> None:
    archive.add("version", b"3\n")
    archive.add(".data/serialization_id", new_serialization_id().encode())


def new_serialization_id() -> str:
    """An id for one saved file, in torch's form (two 64-bit numbers, 20 digits each); torch
    records it for tooling, and no loader checks it."""
    return f"{random.getrandbits(64):020d}{random.getrandbits(64):020d}"


def _tensor_pickle(dtype: str, numel: int, shape: Sequence[int]) -> bytes:
    """What `torch.save` pickles for a contiguous CPU tensor with its own storage "0":

    torch._utils._rebuild_tensor_v2(
        <persistent id ("storage", torch.<X>Storage, "0", "cpu", numel)>,
        0, shape, contiguous stride, False, collections.OrderedDict())

    with the memo entries Python's pickler (protocol 2) assigns."""
    stride = _contiguous_stride(shape)
    return b"".join(
        (
            b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00((",
            _pickle_str("storage"),
            b"q\x01ctorch\n" + DTYPES[dtype].storage_class.encode() + b"\nq\x02",
            _pickle_str("0") + b"q\x03",
            _pickle_str("cpu") + b"q\x04",
            pickle_int(numel),
            b"tq\x05QK\x00",  # the persistent id tuple; BINPERSID; storage offset 0
            _pickle_tuple(shape) + b"q\x06",
            _pickle_tuple(stride) + b"q\x07",
            b"\x89ccollections\nOrderedDict\nq\x08)Rq\ttq\nRq\x0b.",
        )
    )


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of a contiguous tensor, as torch computes them (a size-0 axis counts as 1)."""
    stride = [1] * len(shape)
    for axis in range(len(shape) - 2, -1, -1):
        stride[axis] = stride[axis + 1] * max(shape[axis + 1], 1)
    return tuple(stride)


def _pickle_str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def pickle_int(value: int) -> bytes:
    """An int as Python's pickler writes it (BININT1, BININT2, BININT or LONG1).

    Args:
        value: the int.

    Returns:
        The opcode and its argument.
    """
    if 0 <= value < 0x100:
        return b"K" + bytes([value])
    if 0 <= value < 0x10000:
        return b"M" + struct.pack("<H", value)
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def _pickle_tuple(values: Sequence[int]) -> bytes:
    """A non-empty tuple of ints (pickle memoizes no empty tuple, and the memo indexes in
    `_tensor_pickle` assume one entry per tuple)."""
    items = b"".join(pickle_int(value) for value in values)
    short_tuple_opcodes = {1: b"\x85", 2: b"\x86", 3: b"\x87"}  # TUPLE1, TUPLE2, TUPLE3
    if len(values) in short_tuple_opcodes:
        return items + short_tuple_opcodes[len(values)]
    return b"(" + items + b"t"  # MARK ... TUPLE


# --- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlainTensor:
    """A tensor stored by `torch.save`: its dtype (safetensors name), shape, and bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: FileBytes


def locate_tensor(path: Path, offset: int = 0, length: int | None = None) -> PlainTensor:
    """The tensor in the `torch.save` archive that occupies bytes `offset` to
    `offset + length` of the file at `path`.

    Args:
        path: the file.
        offset: where the archive starts in it.
        length: the archive's size (default: the rest of the file).

    Returns:
        The tensor's dtype, shape and the byte range of its data.

    Raises:
        NotAPlainTensor: anything but one contiguous tensor of a known dtype, as `torch.save`
            writes it (a strided view, another object, a damaged archive), for the caller to
            fall back to torch's own reader.
    """
    try:
        return _locate_tensor(path, offset, length)
    except (struct.error, ValueError, StopIteration) as error:  # torn zip fields
        raise NotAPlainTensor(f"{path}: damaged archive at byte {offset} ({error})") from error


def _locate_tensor(path: Path, offset: int, length: int | None) -> PlainTensor:
    with open(path, "rb") as stream:
        if length is None:
            length = os.fstat(stream.fileno()).st_size - offset
        records = read_directory(stream, offset, length)
        pickle_name = next((name for name in records if name.endswith("/data.pkl")), None)
        if pickle_name is None:
            raise NotAPlainTensor(f"{path}: no data.pkl in the archive at byte {offset}")
        prefix = pickle_name[: -len("data.pkl")]
        pickle_start, pickle_size = record_data(stream, offset, records[pickle_name])
        stream.seek(pickle_start)
        storage_key, storage_class, numel, storage_offset, shape, stride = _unpickle_tensor(
            stream.read(pickle_size)
        )
        dtype = DTYPES_BY_STORAGE_CLASS.get(storage_class)
        data_record = records.get(f"{prefix}data/{storage_key}")
        if dtype is None or data_record is None:
            raise NotAPlainTensor(f"{path}: storage {storage_class} {storage_key!r} not found")
        data_start, data_size = record_data(stream, offset, data_record)
    size = byte_count(shape, dtype.safetensors_name)
    start = storage_offset * dtype.itemsize
    if (
        stride != _contiguous_stride(shape)
        or start + size > data_size
        or numel * dtype.itemsize != data_size
    ):
        raise NotAPlainTensor(f"{path}: the tensor at byte {offset} is a strided view")
    return PlainTensor(
        dtype.safetensors_name, tuple(shape), FileBytes(path, data_start + start, size)
    )


class _TensorUnpickler(pickle.Unpickler):
    """Accepts exactly what `torch.save` pickles for one tensor, and returns its description
    instead of building it."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _describe_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in DTYPES_BY_STORAGE_CLASS:
            return name
        raise NotAPlainTensor(f"the pickle refers to {module}.{name}")

    def persistent_load(self, persistent_id: object) -> object:
        if not (isinstance(persistent_id, tuple) and persistent_id[:1] == ("storage",)):
            raise NotAPlainTensor(f"unexpected persistent id {persistent_id!r}")
        return persistent_id


def _describe_tensor(storage, storage_offset, size, stride, requires_grad, hooks, *rest):
    _, storage_class, key, _location, numel = storage
    return key, storage_class, numel, storage_offset, tuple(size), tuple(stride)


def _unpickle_tensor(data: bytes) -> tuple:
    try:
        description = _TensorUnpickler(io.BytesIO(data)).load()
    except NotAPlainTensor:
        raise
    except Exception as error:  # a torn or foreign pickle raises many types
        raise NotAPlainTensor(f"unreadable data.pkl ({error})") from error
    if not (isinstance(description, tuple) and len(description) == 6):
        raise NotAPlainTensor("data.pkl holds something other than one tensor")
    return description
