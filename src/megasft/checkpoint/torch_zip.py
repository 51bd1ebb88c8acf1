"""The uncompressed zip archive that `torch.save` writes, written and read without torch.

`ZipWriter` lays records out front to back as `torch.save` 2.x does (data aligned to 64 bytes,
data descriptors, zip64 end records always); `read_directory` and `record_data` find a
record's bytes. The record contents (pickle, tensor bytes) are `torch_save_format`'s concern.
See docs/convert.md, "The files, written without torch".
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megasft.checkpoint.tensor_bytes import ByteSource, copy_bytes_with_crc32, total_length

ALIGNMENT = 64
"""Each record's data starts at a multiple of this many bytes, as in `torch.save`."""
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


@dataclass
class _Record:
    name: bytes
    header_offset: int
    size: int
    crc: int


class ZipWriter:
    """Writes an uncompressed zip archive front to back, the way `torch.save` lays it out;
    record names are relative to `archive_name`."""

    def __init__(self, path: Path, archive_name: str) -> None:
        self._prefix = archive_name + "/"
        self._descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._position = 0
        self._records: list[_Record] = []

    def __enter__(self) -> ZipWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.close(self._descriptor)

    def add(self, name: str, data: bytes) -> None:
        """Write a record holding `data` (small records: the pickle, the format markers).

        Args:
            name: the record's name, relative to the archive's.
            data: its bytes.
        """
        record = self._start_record(name, len(data))
        record.crc = zlib.crc32(data)
        self._write(data)
        self._end_record(record)

    def add_streamed(self, name: str, sources: Sequence[ByteSource]) -> None:
        """Write a record whose bytes are copied from `sources`, their CRC-32 computed on the way.

        Args:
            name: the record's name, relative to the archive's.
            sources: its bytes, in order.
        """
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
        padding = -data_start % ALIGNMENT
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


def read_directory(stream: io.BufferedReader, offset: int, length: int) -> dict[str, tuple]:
    """The records of the archive at bytes `offset` to `offset + length` of `stream`.

    Args:
        stream: the open file holding the archive.
        offset: where the archive starts in the file.
        length: the archive's size in bytes.

    Returns:
        Record name -> (local header offset, size), from the central directory.

    Raises:
        NotAPlainTensor: no (zip64) end-of-directory record, a damaged directory, or a
            compressed record.
    """
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


def record_data(stream: io.BufferedReader, offset: int, record: tuple) -> tuple[int, int]:
    """Where a record's data lies in the file, after its local header.

    Args:
        stream: the open file holding the archive.
        offset: where the archive starts in the file.
        record: (local header offset, size), as `read_directory` gives it.

    Returns:
        (file position, size) of the record's data.

    Raises:
        NotAPlainTensor: the local header is damaged.
    """
    header_offset, size = record
    stream.seek(offset + header_offset)
    header = stream.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise NotAPlainTensor("damaged zip local header")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return offset + header_offset + _LOCAL_HEADER.size + name_length + extra_length, size
