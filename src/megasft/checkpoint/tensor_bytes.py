"""Tensor data as byte ranges of files, and copying them into an output file.

The converters never build tensors. Every tensor they write is a sequence of byte sources:
a range of an input file (a renamed tensor is one range; a fused QKV is the heads of q, k
and v, in megatron-core's order), zeros (the vocabulary padding), or bytes already in
memory (only on the slow paths: `pytorch_model.bin` input, checkpoints whose chunks must be
resharded). Copying them costs what `cp` costs: the kernel moves file bytes from the page
cache to the output (`sendfile`), without a copy through this process. Where the output
format needs a CRC-32 of the data (the zip records of `torch.save`), a second thread reads
the same bytes meanwhile, memory-mapped a window at a time. No window stays mapped, so
resident memory stays at one window whatever the model's size.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

WINDOW_BYTES = 16 * 2**20
"""Input mapped, and CRC'd, per step; the resident memory the copy adds."""


def _crc32_function() -> Callable[[memoryview, int], int]:
    """`zlib.crc32`, or libdeflate's where the system has it (Debian's and Ubuntu's
    `libdeflate0`): the same checksum, about 3x faster (9 against 2.9 GB/s here, with the CPU's
    carry-less multiply), and the CRC is most of the CPU time of writing a megatron checkpoint.
    libdeflate reads a writable buffer only (ctypes takes no address of a read-only one);
    the CRC windows are mapped copy-on-write for it, and never written."""
    try:
        function = ctypes.CDLL("libdeflate.so.0").libdeflate_crc32
    except (OSError, AttributeError):
        return zlib.crc32
    function.restype = ctypes.c_uint32
    function.argtypes = (ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t)

    def libdeflate_crc32(data: memoryview, value: int = 0) -> int:
        if data.readonly or not data.nbytes:
            return zlib.crc32(data, value)
        array = (ctypes.c_char * data.nbytes).from_buffer(data)  # holds an export of `data`
        try:
            return function(value, ctypes.addressof(array), data.nbytes)  # releases the GIL
        finally:
            del array

    return libdeflate_crc32


crc32 = _crc32_function()
"""CRC-32 as `zlib.crc32(data, value)` computes it."""


@dataclass(frozen=True)
class DType:
    """One element type, under the names each format gives it."""

    safetensors_name: str
    """As in a safetensors header, e.g. "BF16"; the name used throughout the converters."""
    torch_name: str
    """The `torch` attribute, e.g. "bfloat16" (DCP metadata, config.json's torch_dtype)."""
    storage_class: str
    """The typed storage class `torch.save` pickles for it, e.g. "BFloat16Storage"."""
    itemsize: int


DTYPES: dict[str, DType] = {
    dtype.safetensors_name: dtype
    for dtype in (
        DType("F64", "float64", "DoubleStorage", 8),
        DType("F32", "float32", "FloatStorage", 4),
        DType("F16", "float16", "HalfStorage", 2),
        DType("BF16", "bfloat16", "BFloat16Storage", 2),
        DType("I64", "int64", "LongStorage", 8),
        DType("I32", "int32", "IntStorage", 4),
        DType("I16", "int16", "ShortStorage", 2),
        DType("I8", "int8", "CharStorage", 1),
        DType("U8", "uint8", "ByteStorage", 1),
        DType("BOOL", "bool", "BoolStorage", 1),
    )
}
"""The supported element types, by safetensors name."""
DTYPES_BY_TORCH_NAME = {dtype.torch_name: dtype for dtype in DTYPES.values()}
DTYPES_BY_STORAGE_CLASS = {dtype.storage_class: dtype for dtype in DTYPES.values()}


def byte_count(shape: Sequence[int], dtype: str) -> int:
    """Bytes of a contiguous tensor of `shape` and `dtype` (a safetensors dtype name)."""
    count = DTYPES[dtype].itemsize
    for size in shape:
        count *= size
    return count


@dataclass(frozen=True)
class FileBytes:
    """`length` bytes of the file at `path`, from byte `offset`."""

    path: Path
    offset: int
    length: int

    def slice(self, start: int, length: int) -> FileBytes:
        if start < 0 or start + length > self.length:
            raise ValueError(f"bytes {start}+{length} outside {self}")
        return FileBytes(self.path, self.offset + start, length)


@dataclass(frozen=True)
class ZeroBytes:
    """`length` zero bytes."""

    length: int

    def slice(self, start: int, length: int) -> ZeroBytes:
        if start < 0 or start + length > self.length:
            raise ValueError(f"bytes {start}+{length} outside {self}")
        return ZeroBytes(length)


@dataclass(frozen=True, eq=False)
class MemoryBytes:
    """Bytes in memory; `owner` keeps the object that holds them (a tensor, an array) alive."""

    data: memoryview
    owner: object = None

    @property
    def length(self) -> int:
        return self.data.nbytes

    def slice(self, start: int, length: int) -> MemoryBytes:
        if start < 0 or start + length > self.length:
            raise ValueError(f"bytes {start}+{length} outside a {self.length}-byte buffer")
        return MemoryBytes(self.data[start : start + length], self.owner)


ByteSource = FileBytes | ZeroBytes | MemoryBytes


def total_length(sources: Sequence[ByteSource]) -> int:
    return sum(source.length for source in sources)


def copy_bytes(destination: int, sources: Sequence[ByteSource]) -> None:
    """Append `sources`, in order, to the file open for writing as `destination` (a file
    descriptor), at its current position."""
    with _OpenFiles() as files:
        for source in sources:
            if isinstance(source, FileBytes):
                _sendfile(destination, files.descriptor(source.path), source.offset, source.length)
            else:
                _each_window(source, files, lambda window: _write_all(destination, window))


def copy_bytes_with_crc32(destination: int, sources: Sequence[ByteSource]) -> int:
    """`copy_bytes`, returning the CRC-32 (as `zlib.crc32`) of all the bytes copied.

    The copy runs on this thread (in the kernel, for file bytes) while a second thread reads
    the same bytes for the CRC; both release the GIL, so with two free cores the CRC costs
    little time. The CRC thread maps a file a window at a time (`_each_window`)."""
    crc = 0

    def update(source: ByteSource) -> None:
        nonlocal crc
        with _OpenFiles() as files:  # its own descriptors: _OpenFiles is not thread-safe

            def checksum(window: memoryview) -> None:
                nonlocal crc
                crc = crc32(window, crc)

            _each_window(source, files, checksum)

    with ThreadPoolExecutor(max_workers=1) as crc_thread:
        # One worker runs the updates in order: the CRC of each source continues the last.
        checksums = [crc_thread.submit(update, source) for source in sources]
        try:
            copy_bytes(destination, sources)
        except BaseException:
            crc_thread.shutdown(cancel_futures=True)
            raise
        for checksum in checksums:
            checksum.result()
    return crc


class _OpenFiles:
    """Input files opened once per copy, closed at its end."""

    def __init__(self) -> None:
        self._descriptors: dict[Path, int] = {}

    def descriptor(self, path: Path) -> int:
        if path not in self._descriptors:
            self._descriptors[path] = os.open(path, os.O_RDONLY)
        return self._descriptors[path]

    def __enter__(self) -> _OpenFiles:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for descriptor in self._descriptors.values():
            os.close(descriptor)


def _sendfile(destination: int, source: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        sent = os.sendfile(destination, source, offset, end - offset)
        if sent == 0:
            raise OSError(f"input ended {end - offset} bytes early (file truncated meanwhile?)")
        offset += sent


def _write_all(destination: int, data: memoryview) -> None:
    while data.nbytes:
        written = os.write(destination, data)
        data = data[written:]


def _each_window(
    source: ByteSource, files: _OpenFiles, action: Callable[[memoryview], None]
) -> None:
    """Call `action` on the bytes of `source`, a window of at most WINDOW_BYTES at a time.

    A file is memory-mapped one window at a time (a mapping starts at a multiple of the
    allocation granularity, so it may begin before the window), and unmapped after `action`.
    On an error the mapping is left to the garbage collector: the traceback may still hold
    views of it, and closing it then would raise over the original error."""
    if isinstance(source, FileBytes):
        descriptor = files.descriptor(source.path)
        offset, end = source.offset, source.offset + source.length
        while offset < end:
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            stop = min(end, start + WINDOW_BYTES)
            # Copy-on-write, never written: a writable buffer for libdeflate (see crc32).
            mapped = mmap.mmap(descriptor, stop - start, offset=start, access=mmap.ACCESS_COPY)
            window = memoryview(mapped)[offset - start :]
            action(window)
            window.release()
            mapped.close()
            offset = stop
    elif isinstance(source, ZeroBytes):
        zeros = memoryview(bytearray(min(source.length, WINDOW_BYTES)))
        for start in range(0, source.length, WINDOW_BYTES):
            action(zeros[: min(WINDOW_BYTES, source.length - start)])
    else:
        data = source.data.cast("B") if source.data.format != "B" else source.data
        for start in range(0, data.nbytes, WINDOW_BYTES):
            action(data[start : start + WINDOW_BYTES])
