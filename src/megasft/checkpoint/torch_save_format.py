"""The file format of `torch.save`, for one tensor, written and read without importing torch.

A DCP checkpoint stores every tensor chunk as the output of `torch.save(chunk)`: an
uncompressed zip archive whose records are

    archive/data.pkl                  pickle (protocol 2): the tensor rebuilt from storage "0"
    archive/.format_version           b"1"
    archive/.storage_alignment        b"64"
    archive/byteorder                 b"little"
    archive/data/0                    the tensor's bytes
    archive/version                   b"3\\n"
    archive/.data/serialization_id    40 decimal digits identifying this save

Each record's data starts at a multiple of 64 bytes (a local header "extra" field named "FB"
pads it), local headers carry no sizes or CRC (bit 3: a data descriptor follows the data),
and the end of the archive always has the zip64 end-of-directory records; a record of
4 GiB or more, or starting beyond 4 GiB, gets zip64 extra fields. The writer here produces
exactly the bytes `torch.save` 2.x writes, save for the serialization id (the tests compare
the two byte for byte), copying the tensor's bytes from their sources while a second thread
computes the CRC-32 the zip directory needs. Importing torch costs more time than converting
a 1 GB model.

The reader locates a tensor's bytes inside such an archive (the zip directory, then the
pickle, read with an unpickler that accepts only what `torch.save` writes for a plain
tensor), so that a converter can copy them without loading them.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megasft.checkpoint.tensor_bytes import (
    DTYPES,
    DTYPES_BY_STORAGE_CLASS,
    ByteSource,
    FileBytes,
    byte_count,
    copy_bytes_with_crc32,
    total_length,
)

STREAM_ARCHIVE_NAME = "archive"
"""The record-name prefix `torch.save` uses when writing to a stream, as DCP does (saving
to a path, it uses the file name without its extension)."""
_ALIGNMENT = 64
_ZIP64_LIMIT = 0xFFFFFFFF
"""Sizes and offsets from here on take zip64 fields (the test lowers it)."""
_ZIP64_MARKER = 0xFFFFFFFF
"""What a 32-bit field holds when the value is in a zip64 field."""
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # signature .. extra length: 30 bytes
_CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")  # signature .. header offset: 46 bytes
_FLAGS = 0x0808  # bit 3: sizes and CRC in a data descriptor; bit 11: UTF-8 names


class NotAPlainTensor(Exception):
    """The archive holds something other than one contiguous tensor as `torch.save` writes it."""


# --- writing ---------------------------------------------------------------------------------


def write_tensor_file(
    path: Path, dtype: str, shape: Sequence[int], sources: Sequence[ByteSource]
) -> int:
    """Write the tensor of `dtype` (a safetensors dtype name) and `shape` whose bytes are
    `sources` as `torch.save` would, into a new file at `path`. Returns the file's size."""
    if not shape:
        raise ValueError(f"{path}: a 0-dimensional tensor is not supported")
    if total_length(sources) != byte_count(shape, dtype):
        raise ValueError(
            f"{path}: {total_length(sources)} bytes for a {dtype} tensor of shape "
            f"{list(shape)} ({byte_count(shape, dtype)} bytes)"
        )
    numel = byte_count(shape, dtype) // DTYPES[dtype].itemsize
    with _ZipWriter(path, STREAM_ARCHIVE_NAME) as archive:
        archive.add("data.pkl", _tensor_pickle(dtype, numel, shape))
        _add_format_records(archive)
        archive.add_streamed("data/0", sources)
        _add_closing_records(archive)
        return archive.finish()


def write_empty_dict_file(path: Path) -> None:
    """Write what `torch.save({}, path)` writes (megatron-core's `common.pt` of a
    weights-only checkpoint)."""
    with _ZipWriter(path, path.stem) as archive:
        archive.add("data.pkl", b"\x80\x02}q\x00.")  # PROTO 2, EMPTY_DICT, BINPUT 0, STOP
        _add_format_records(archive)
        _add_closing_records(archive)
        archive.finish()


def _add_format_records(archive: _ZipWriter) -> None:
    archive.add(".format_version", b"1")
    archive.add(".storage_alignment", str(_ALIGNMENT).encode())
    archive.add("byteorder", b"little")


def _add_closing_records(archive: _ZipWriter) -> None:
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
    """An int as Python's pickler writes it (BININT1, BININT2, BININT or LONG1)."""
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


@dataclass
class _Record:
    name: bytes
    header_offset: int
    size: int
    crc: int


class _ZipWriter:
    """Writes an uncompressed zip archive front to back, the way `torch.save` lays it out;
    record names are relative to `archive_name`."""

    def __init__(self, path: Path, archive_name: str) -> None:
        self._prefix = archive_name + "/"
        self._descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._position = 0
        self._records: list[_Record] = []

    def __enter__(self) -> _ZipWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.close(self._descriptor)

    def add(self, name: str, data: bytes) -> None:
        record = self._start_record(name, len(data))
        record.crc = zlib.crc32(data)
        self._write(data)
        self._end_record(record)

    def add_streamed(self, name: str, sources: Sequence[ByteSource]) -> None:
        record = self._start_record(name, total_length(sources))
        record.crc = copy_bytes_with_crc32(self._descriptor, sources)
        self._position += record.size
        self._end_record(record)

    def finish(self) -> int:
        """Write the central directory and the end records; returns the archive's size."""
        directory_offset = self._position
        directory = io.BytesIO()
        for record in self._records:
            zip64 = b""
            size = offset = None
            if record.size >= _ZIP64_LIMIT:
                zip64 += struct.pack("<QQ", record.size, record.size)
                size = _ZIP64_MARKER
            if record.header_offset >= _ZIP64_LIMIT:
                zip64 += struct.pack("<Q", record.header_offset)
                offset = _ZIP64_MARKER
            extra = struct.pack("<HH", 1, len(zip64)) + zip64 if zip64 else b""
            directory.write(
                _CENTRAL_HEADER.pack(
                    0x02014B50,
                    0,  # version made by
                    0,  # version needed
                    _FLAGS,
                    0,  # stored
                    0,  # time
                    0,  # date
                    record.crc,
                    record.size if size is None else size,
                    record.size if size is None else size,
                    len(record.name),
                    len(extra),
                    0,  # comment length
                    0,  # disk
                    0,  # internal attributes
                    0,  # external attributes
                    record.header_offset if offset is None else offset,
                )
                + record.name
                + extra
            )
        directory_size = directory.tell()
        end64_offset = directory_offset + directory_size
        count = len(self._records)
        directory.write(
            struct.pack(
                "<IQHHIIQQQQ",
                0x06064B50,
                44,  # size of the rest of this record
                0x031E,  # version made by
                0x2D,  # version needed (4.5, zip64)
                0,
                0,
                count,
                count,
                directory_size,
                directory_offset,
            )
        )
        directory.write(struct.pack("<IIQI", 0x07064B50, 0, end64_offset, 1))
        directory.write(
            struct.pack(
                "<IHHHHIIH",
                0x06054B50,
                0,
                0,
                count,
                count,
                directory_size,
                directory_offset if directory_offset < _ZIP64_LIMIT else _ZIP64_MARKER,
                0,  # comment length
            )
        )
        self._write(directory.getvalue())
        return self._position

    def _start_record(self, name: str, size: int) -> _Record:
        encoded = (self._prefix + name).encode()
        record = _Record(encoded, self._position, size, 0)
        # Where a size or this header's offset needs 64 bits, a zip64 field comes first (as
        # miniz writes it: the size and a compressed size of 0, then the offset), then the
        # "FB" field whose padding puts the data at a multiple of 64 bytes.
        zip64 = b""
        if size >= _ZIP64_LIMIT:
            zip64 += struct.pack("<QQ", size, 0)
        if record.header_offset >= _ZIP64_LIMIT:
            zip64 += struct.pack("<Q", record.header_offset)
        extra = struct.pack("<HH", 1, len(zip64)) + zip64 if zip64 else b""
        data_start = self._position + _LOCAL_HEADER.size + len(encoded) + len(extra) + 4
        padding = -data_start % _ALIGNMENT
        extra += b"FB" + struct.pack("<H", padding) + b"Z" * padding
        header = _LOCAL_HEADER.pack(
            0x04034B50, 0, _FLAGS, 0, 0, 0, 0, 0, 0, len(encoded), len(extra)
        )
        self._write(header + encoded + extra)
        self._records.append(record)
        return record

    def _end_record(self, record: _Record) -> None:
        """The data descriptor: CRC and sizes, 64-bit ones for a zip64 record."""
        zip64 = record.size >= _ZIP64_LIMIT or record.header_offset >= _ZIP64_LIMIT
        size_format = "Q" if zip64 else "I"
        self._write(
            struct.pack(
                f"<II{size_format}{size_format}", 0x08074B50, record.crc, record.size, record.size
            )
        )

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view.nbytes:
            view = view[os.write(self._descriptor, view) :]
        self._position += len(data)


# --- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlainTensor:
    """A tensor stored by `torch.save`: its dtype (safetensors name), shape, and bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: FileBytes


def locate_tensor(path: Path, offset: int = 0, length: int | None = None) -> PlainTensor:
    """The tensor in the `torch.save` archive that occupies bytes `offset` to
    `offset + length` of the file at `path` (the whole file by default).

    Raises `NotAPlainTensor` for anything but one contiguous tensor of a known dtype, as
    `torch.save` writes it (a strided view, another object, a damaged archive), for the
    caller to fall back to torch's own reader."""
    try:
        return _locate_tensor(path, offset, length)
    except (struct.error, ValueError, StopIteration) as error:  # torn zip fields
        raise NotAPlainTensor(f"{path}: damaged archive at byte {offset} ({error})") from error


def _locate_tensor(path: Path, offset: int, length: int | None) -> PlainTensor:
    with open(path, "rb") as stream:
        if length is None:
            length = os.fstat(stream.fileno()).st_size - offset
        records = _read_directory(stream, offset, length)
        pickle_name = next((name for name in records if name.endswith("/data.pkl")), None)
        if pickle_name is None:
            raise NotAPlainTensor(f"{path}: no data.pkl in the archive at byte {offset}")
        prefix = pickle_name[: -len("data.pkl")]
        pickle_start, pickle_size = _record_data(stream, offset, records[pickle_name])
        stream.seek(pickle_start)
        storage_key, storage_class, numel, storage_offset, shape, stride = _unpickle_tensor(
            stream.read(pickle_size)
        )
        dtype = DTYPES_BY_STORAGE_CLASS.get(storage_class)
        data_record = records.get(f"{prefix}data/{storage_key}")
        if dtype is None or data_record is None:
            raise NotAPlainTensor(f"{path}: storage {storage_class} {storage_key!r} not found")
        data_start, data_size = _record_data(stream, offset, data_record)
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


def _read_directory(stream: io.BufferedReader, offset: int, length: int) -> dict[str, tuple]:
    """Record name -> (local header offset, size) from the archive's central directory."""
    tail_size = min(length, 64 * 1024)
    stream.seek(offset + length - tail_size)
    tail = stream.read(tail_size)
    end = tail.rfind(b"PK\x05\x06")
    if end < 0 or len(tail) - end < 22:
        raise NotAPlainTensor("no zip end-of-directory record")
    (_, _, _, _, count, directory_size, directory_offset, _) = struct.unpack(
        "<IHHHHIIH", tail[end : end + 22]
    )
    if directory_offset == _ZIP64_MARKER or count == 0xFFFF or directory_size == _ZIP64_MARKER:
        locator = tail[end - 20 : end]
        if len(locator) != 20 or locator[:4] != b"PK\x06\x07":
            raise NotAPlainTensor("no zip64 end-of-directory locator")
        (end64_offset,) = struct.unpack("<Q", locator[8:16])
        stream.seek(offset + end64_offset)
        end64 = stream.read(56)
        if end64[:4] != b"PK\x06\x06":
            raise NotAPlainTensor("no zip64 end-of-directory record")
        count, directory_size, directory_offset = struct.unpack("<QQQ", end64[32:56])
    stream.seek(offset + directory_offset)
    directory = stream.read(directory_size)
    records: dict[str, tuple] = {}
    position = 0
    for _ in range(count):
        (
            signature,
            _version_made_by,
            _version_needed,
            _flags,
            method,
            _time,
            _date,
            _crc,
            compressed_size,
            size,
            name_length,
            extra_length,
            comment_length,
            _disk,
            _internal_attributes,
            _external_attributes,
            header_offset,
        ) = _CENTRAL_HEADER.unpack_from(directory, position)
        if signature != 0x02014B50:
            raise NotAPlainTensor("damaged zip central directory")
        name_start = position + _CENTRAL_HEADER.size
        name = directory[name_start : name_start + name_length].decode()
        extra = directory[name_start + name_length : name_start + name_length + extra_length]
        size, header_offset = _apply_zip64(extra, size, compressed_size, header_offset)
        if method != 0:
            raise NotAPlainTensor(f"record {name} is compressed")
        records[name] = (header_offset, size)
        position = name_start + name_length + extra_length + comment_length
    return records


def _apply_zip64(extra: bytes, size: int, compressed_size: int, header_offset: int) -> tuple:
    """Sizes and offset that do not fit 32 bits come from the zip64 extra field, in order."""
    position = 0
    while position + 4 <= len(extra):
        field_id, field_length = struct.unpack_from("<HH", extra, position)
        if field_id == 1:
            values = iter(struct.unpack_from(f"<{field_length // 8}Q", extra, position + 4))
            if size == _ZIP64_MARKER:
                size = next(values)
            if compressed_size == _ZIP64_MARKER:
                next(values)
            if header_offset == _ZIP64_MARKER:
                header_offset = next(values)
        position += 4 + field_length
    return size, header_offset


def _record_data(stream: io.BufferedReader, offset: int, record: tuple) -> tuple[int, int]:
    """(file position, size) of a record's data, after its local header."""
    header_offset, size = record
    stream.seek(offset + header_offset)
    header = stream.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise NotAPlainTensor("damaged zip local header")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return offset + header_offset + _LOCAL_HEADER.size + name_length + extra_length, size


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
