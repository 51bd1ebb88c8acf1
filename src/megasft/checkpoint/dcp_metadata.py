"""The `.metadata` file of a DCP checkpoint, written and read without importing torch.

The writer pickles what DCP's `FileSystemWriter` would, naming DCP's classes by module and name
instead of importing them (that costs about a second); the reader unpickles into plain
stand-ins for exactly those names, and falls back to DCP itself for anything else. What each
object pickles as, and why: docs/convert.md, "The files, written without torch".
"""

from __future__ import annotations

import io
import pickle
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megasft.checkpoint.tensor_bytes import DTYPES, DTYPES_BY_TORCH_NAME
from megasft.checkpoint.torch_save_format import pickle_int

DCP_METADATA_FILE = ".metadata"
DCP_VERSION = "1.0.0"
"""What torch 2.x's `FileSystemWriter` records as `Metadata.version`."""

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_FILESYSTEM_MODULE = "torch.distributed.checkpoint.filesystem"


@dataclass(frozen=True)
class StoredChunk:
    """One chunk of a tensor and where its `torch.save` archive lies."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    """The data file, relative to the checkpoint directory."""
    file_offset: int
    length: int
    transformed: bool = False
    """Stored through a DCP storage extension (compressed, ...): not a plain archive."""


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as a DCP checkpoint records it."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    """The safetensors name of its dtype ("BF16"), or "torch.<name>" for one not supported."""
    chunks: tuple[StoredChunk, ...]


# --- writing ---------------------------------------------------------------------------------


def write_metadata(path: Path, tensors: Sequence[StoredTensor], checkpoint_id: str) -> None:
    """Write what DCP's `FileSystemWriter` writes as `.metadata` for these tensors.

    Args:
        path: the file to write.
        tensors: every stored tensor, with its chunks and their files.
        checkpoint_id: recorded as the checkpoint's id (`StorageMeta.checkpoint_id`).
    """
    state_dict_metadata = {}
    storage_data = {}
    for tensor in tensors:
        state_dict_metadata[tensor.key] = _Object(
            _Global(_METADATA_MODULE, "TensorStorageMetadata"),
            {
                "properties": _Object(
                    _Global(_METADATA_MODULE, "TensorProperties"),
                    (
                        _Global("torch", DTYPES[tensor.dtype].torch_name),
                        _Call(_Global("torch.serialization", "_get_layout"), ("torch.strided",)),
                        False,  # requires_grad
                        _Call(_Global(_METADATA_MODULE, "_MEM_FORMAT_ENCODING"), (0,)),
                        False,  # pin_memory
                    ),
                ),
                "size": _torch_size(tensor.shape),
                "chunks": [
                    _Object(
                        _Global(_METADATA_MODULE, "ChunkStorageMetadata"),
                        {"offsets": _torch_size(chunk.offsets), "sizes": _torch_size(chunk.sizes)},
                    )
                    for chunk in tensor.chunks
                ],
            },
        )
        for index, chunk in enumerate(tensor.chunks):
            key = _Object(
                _Global(_METADATA_MODULE, "MetadataIndex"),
                {"fqn": tensor.key, "index": index, "offset": _torch_size(chunk.offsets)},
            )
            storage_data[key] = _Object(
                _Global(_FILESYSTEM_MODULE, "_StorageInfo"),
                {"relative_path": chunk.file, "offset": chunk.file_offset, "length": chunk.length},
            )
    metadata = _Object(
        _Global(_METADATA_MODULE, "Metadata"),
        {
            "state_dict_metadata": state_dict_metadata,
            "planner_data": None,
            "storage_data": storage_data,
            "storage_meta": _Object(
                _Global(_METADATA_MODULE, "StorageMeta"),
                {
                    "checkpoint_id": checkpoint_id,
                    "save_id": str(uuid.uuid4()),
                    "load_id": None,
                    "modules": [],
                },
            ),
            "version": DCP_VERSION,
        },
    )
    path.write_bytes(_PickleWriter().dumps(metadata))


def _torch_size(values: Sequence[int]) -> _Call:
    return _Call(_Global("torch", "Size"), (tuple(values),))


@dataclass(frozen=True)
class _Global:
    """A module-level name: a class, a function, a dtype."""

    module: str
    name: str


@dataclass(frozen=True)
class _Call:
    """`function(*arguments)`, evaluated when unpickled (REDUCE)."""

    function: _Global
    arguments: tuple


@dataclass(frozen=True, eq=False)
class _Object:
    """An instance of `cls` made without `__init__` and given `state` (NEWOBJ, BUILD), as
    pickle stores a dataclass. Hashable by identity: it is also a dict key (MetadataIndex)."""

    cls: _Global
    state: object


class _PickleWriter:
    """A protocol-2 pickle of None, bools, ints, strs, tuples, lists, dicts and the three
    records above. Strings and globals are memoized (BINPUT once, BINGET after)."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._memo: dict[tuple[str, object], int] = {}

    def dumps(self, value: object) -> bytes:
        self._out.write(b"\x80\x02")  # PROTO 2
        self._save(value)
        self._out.write(b".")  # STOP
        return self._out.getvalue()

    def _save(self, value: object) -> None:
        write = self._out.write
        if value is None:
            write(b"N")
        elif value is True or value is False:
            write(b"\x88" if value else b"\x89")
        elif isinstance(value, int):
            write(pickle_int(value))
        elif isinstance(value, str):
            if not self._get(("str", value)):
                data = value.encode()
                write(b"X" + struct.pack("<I", len(data)) + data)
                self._put(("str", value))
        elif isinstance(value, tuple):
            if not value:
                write(b")")
                return
            write(b"(")
            for item in value:
                self._save(item)
            write(b"t")
        elif isinstance(value, list):
            write(b"]")
            if value:
                write(b"(")
                for item in value:
                    self._save(item)
                write(b"e")  # APPENDS
        elif isinstance(value, dict):
            write(b"}")
            if value:
                write(b"(")
                for key, item in value.items():
                    self._save(key)
                    self._save(item)
                write(b"u")  # SETITEMS
        elif isinstance(value, _Global):
            if not self._get(("global", (value.module, value.name))):
                write(b"c" + value.module.encode() + b"\n" + value.name.encode() + b"\n")
                self._put(("global", (value.module, value.name)))
        elif isinstance(value, _Call):
            self._save(value.function)
            self._save(value.arguments)
            write(b"R")  # REDUCE
        elif isinstance(value, _Object):
            self._save(value.cls)
            write(b")\x81")  # EMPTY_TUPLE, NEWOBJ
            self._save(value.state)
            write(b"b")  # BUILD
        else:
            raise TypeError(f"cannot pickle {type(value).__name__} here")

    def _get(self, key: tuple[str, object]) -> bool:
        index = self._memo.get(key)
        if index is None:
            return False
        self._out.write(b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index))
        return True

    def _put(self, key: tuple[str, object]) -> None:
        index = self._memo[key] = len(self._memo)
        self._out.write(b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index))


# --- reading ---------------------------------------------------------------------------------


class UnknownMetadata(Exception):
    """The metadata names something this reader does not know; read it with DCP instead."""


def read_metadata(path: Path) -> list[StoredTensor]:
    """The tensors recorded in a DCP `.metadata` file, read without torch.

    Args:
        path: the `.metadata` file.

    Returns:
        The stored tensors, with their chunks.

    Raises:
        UnknownMetadata: the pickle names anything but the classes and functions
            `write_metadata` names (the caller then reads it with DCP: `metadata_from_dcp`).
        Exception: the unpickler's own errors, for a damaged file.
    """
    with open(path, "rb") as stream:
        metadata = _StandInUnpickler(stream).load()
    return metadata_from_dcp(metadata)


def metadata_from_dcp(metadata: object) -> list[StoredTensor]:
    """The tensors of a DCP `Metadata`, as torch builds it or as `read_metadata`'s stand-ins
    (which carry the same attributes; dtypes and layouts are names there).

    Args:
        metadata: the unpickled `Metadata` (or its stand-in).

    Returns:
        The stored tensors, with their chunks; pickled objects (not weights) are left out.
    """
    storage = {
        (index.fqn, tuple(index.offset)): info
        for index, info in (getattr(metadata, "storage_data", None) or {}).items()
        if getattr(index, "offset", None) is not None  # None: a pickled object, not a tensor
    }
    tensors = []
    for key, entry in metadata.state_dict_metadata.items():
        if type(entry).__name__ != "TensorStorageMetadata":
            continue  # BytesStorageMetadata: pickled objects, not weights
        chunks = []
        for chunk in entry.chunks:
            info = storage.get((key, tuple(chunk.offsets)))
            chunks.append(
                StoredChunk(
                    offsets=tuple(chunk.offsets),
                    sizes=tuple(chunk.sizes),
                    file=str(getattr(info, "relative_path", "")),
                    file_offset=getattr(info, "offset", 0),
                    length=getattr(info, "length", 0),
                    transformed=info is None or bool(getattr(info, "transform_descriptors", None)),
                )
            )
        torch_name = str(entry.properties.dtype).removeprefix("torch.")
        dtype = DTYPES_BY_TORCH_NAME.get(torch_name)
        tensors.append(
            StoredTensor(
                key=key,
                shape=tuple(entry.size),
                dtype=dtype.safetensors_name if dtype else f"torch.{torch_name}",
                chunks=tuple(chunks),
            )
        )
    return tensors


class _StandIn:
    """An object of a DCP class, with the attributes its pickled state gives it."""

    def __setstate__(self, state: object) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif type(self).__name__ == "TensorProperties" and isinstance(state, tuple):
            self.dtype, self.layout, self.requires_grad, _, self.pin_memory = state
        else:
            raise UnknownMetadata(f"unexpected pickled state of {type(self).__name__}")


_STAND_INS = {
    (_METADATA_MODULE, name): type(name, (_StandIn,), {})
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
    )
} | {(_FILESYSTEM_MODULE, "_StorageInfo"): type("_StorageInfo", (_StandIn,), {})}


def _path_name(*parts: str) -> str:
    return "/".join(parts)


class _StandInUnpickler(pickle.Unpickler):
    _FUNCTIONS = {
        ("torch", "Size"): tuple,
        ("torch.serialization", "_get_layout"): str,
        (_METADATA_MODULE, "_MEM_FORMAT_ENCODING"): int,
        ("collections", "OrderedDict"): dict,
        ("pathlib", "PosixPath"): _path_name,
        ("pathlib", "PurePosixPath"): _path_name,
        ("pathlib", "Path"): _path_name,
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _STAND_INS:
            return _STAND_INS[(module, name)]
        if (module, name) in self._FUNCTIONS:
            return self._FUNCTIONS[(module, name)]
        if module == "torch" and name in DTYPES_BY_TORCH_NAME:
            return name
        raise UnknownMetadata(f"the metadata refers to {module}.{name}")
