"""The torch-free writers produce what torch and DCP write, and the readers read what they write.

The converters write `torch.save` archives and DCP's `.metadata` without importing torch;
these tests hold them to torch's own output: byte for byte for the archives (save for the id
torch draws for each save), object for object for the metadata.
"""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import warnings
import zipfile
import zlib

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from megasft.checkpoint import dcp_metadata, tensor_bytes, torch_save_format, torch_zip
from megasft.checkpoint.dcp_metadata import StoredChunk, StoredTensor
from megasft.checkpoint.dist_checkpoint_io import DistCheckpointReader
from megasft.checkpoint.tensor_bytes import (
    DTYPES_BY_TORCH_NAME,
    FileBytes,
    MemoryBytes,
    ZeroBytes,
)

TENSORS = {
    "bf16 [100, 64]": torch.randn(100, 64).to(torch.bfloat16),
    "fp32 [5]": torch.randn(5),
    "fp16 [1, 3, 4]": torch.randn(1, 3, 4).half(),
    "int8 [2, 3, 4, 5]": torch.randint(-100, 100, (2, 3, 4, 5)).to(torch.int8),
    "int64 [70000]": torch.arange(70000),
    "bool [3]": torch.tensor([True, False, True]),
}


def dtype_name(tensor: torch.Tensor) -> str:
    return DTYPES_BY_TORCH_NAME[str(tensor.dtype).removeprefix("torch.")].safetensors_name


def memory_bytes(tensor: torch.Tensor) -> MemoryBytes:
    array = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    return MemoryBytes(memoryview(array), owner=array)


def serialization_id(archive: bytes) -> str:
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        (name,) = [name for name in opened.namelist() if name.endswith("serialization_id")]
        return opened.read(name).decode()


@pytest.mark.parametrize("name", sorted(TENSORS))
def test_tensor_file_is_what_torch_save_writes(name, tmp_path, monkeypatch):
    tensor = TENSORS[name]
    stream = io.BytesIO()
    torch.save(tensor, stream)  # DCP saves each chunk into a stream like this
    expected = stream.getvalue()
    monkeypatch.setattr(
        torch_save_format, "new_serialization_id", lambda: serialization_id(expected)
    )

    size = torch_save_format.write_tensor_file(
        tmp_path / "chunk", dtype_name(tensor), tuple(tensor.shape), [memory_bytes(tensor)]
    )

    assert (tmp_path / "chunk").read_bytes() == expected
    assert size == len(expected)


def test_empty_dict_file_is_what_torch_save_writes(tmp_path, monkeypatch):
    (tmp_path / "expected").mkdir()
    torch.save({}, tmp_path / "expected" / "common.pt")
    expected = (tmp_path / "expected" / "common.pt").read_bytes()
    monkeypatch.setattr(
        torch_save_format, "new_serialization_id", lambda: serialization_id(expected)
    )
    torch_save_format.write_empty_dict_file(tmp_path / "common.pt")
    assert (tmp_path / "common.pt").read_bytes() == expected


def test_zip64_records_load_in_torch_and_check_out(tmp_path, monkeypatch):
    # Records of 4 GiB, or beyond 4 GiB, get zip64 fields (checked byte for byte against
    # torch.save of a 4 GiB tensor while writing this); a lowered limit gives every record
    # some, on a small file.
    monkeypatch.setattr(torch_zip, "_ZIP64_LIMIT", 200)
    tensor = torch.randn(30, 20)
    torch_save_format.write_tensor_file(tmp_path / "chunk", "F32", (30, 20), [memory_bytes(tensor)])

    assert torch.equal(torch.load(tmp_path / "chunk", weights_only=True), tensor)
    with zipfile.ZipFile(tmp_path / "chunk") as archive:
        assert archive.testzip() is None  # every CRC matches
    located = torch_save_format.locate_tensor(tmp_path / "chunk")
    assert located.shape == (30, 20)
    data = (tmp_path / "chunk").read_bytes()[located.data.offset :][: located.data.length]
    assert data == memory_bytes(tensor).data.tobytes()


def test_located_tensor_bytes_are_the_tensor(tmp_path):
    for number, tensor in enumerate(TENSORS.values()):
        torch.save(tensor, tmp_path / f"{number}.pt")
        located = torch_save_format.locate_tensor(tmp_path / f"{number}.pt")
        assert (located.dtype, located.shape) == (dtype_name(tensor), tuple(tensor.shape))
        data = (tmp_path / f"{number}.pt").read_bytes()[located.data.offset :]
        assert data[: located.data.length] == memory_bytes(tensor).data.tobytes()


def test_views_are_located_in_their_storage_or_refused_when_strided(tmp_path):
    whole = torch.randn(10, 4)
    torch.save(whole[2:5], tmp_path / "rows.pt")  # torch.save stores the whole storage
    located = torch_save_format.locate_tensor(tmp_path / "rows.pt")
    data = (tmp_path / "rows.pt").read_bytes()[located.data.offset :][: located.data.length]
    assert located.shape == (3, 4)
    assert data == memory_bytes(whole[2:5]).data.tobytes()

    torch.save(whole[:, 1:3], tmp_path / "columns.pt")
    with pytest.raises(torch_save_format.NotAPlainTensor):
        torch_save_format.locate_tensor(tmp_path / "columns.pt")


CRC32_FUNCTIONS = {"zlib": zlib.crc32, "active": tensor_bytes.crc32}
"""zlib's, and the one the converter uses (libdeflate's where the system has it)."""


@pytest.mark.parametrize("crc32", sorted(CRC32_FUNCTIONS))
def test_copies_and_crc_span_windows_and_kinds_of_source(crc32, tmp_path, monkeypatch):
    monkeypatch.setattr(tensor_bytes, "crc32", CRC32_FUNCTIONS[crc32])
    monkeypatch.setattr(tensor_bytes, "WINDOW_BYTES", 4096)
    content = bytes(range(256)) * 100
    (tmp_path / "input").write_bytes(content)
    sources = [
        FileBytes(tmp_path / "input", 5000, 12000),  # starts off a page, spans windows
        ZeroBytes(9000),
        MemoryBytes(memoryview(content)).slice(100, 5000),
        FileBytes(tmp_path / "input", 0, 7),
    ]
    expected = content[5000:17000] + bytes(9000) + content[100:5100] + content[:7]
    with open(tmp_path / "crc", "wb") as output:
        crc = tensor_bytes.copy_bytes_with_crc32(output.fileno(), sources)
    with open(tmp_path / "plain", "wb") as output:
        tensor_bytes.copy_bytes(output.fileno(), sources)
    assert (tmp_path / "crc").read_bytes() == expected
    assert (tmp_path / "plain").read_bytes() == expected
    assert crc == zlib.crc32(expected)


def test_crc32_is_zlibs_for_any_buffer():
    data = bytearray(range(256)) * 4099
    for value in (0, 0xDEADBEEF):
        for buffer in (data, bytes(data), data[7:70001], b""):  # writable, read-only, odd, empty
            assert tensor_bytes.crc32(memoryview(buffer), value) == zlib.crc32(buffer, value)


@pytest.fixture(params=[False, True], ids=["file per tensor", "one file"])
def dcp_checkpoint(request, tmp_path):
    """A checkpoint DCP wrote itself, unflattened (as megatron-core calls it): one file per
    tensor, as the converter lays it out, or every tensor in one file, as megatron-core does."""
    state_dict = {
        "embedding.weight": torch.randn(128, 64).to(torch.bfloat16),
        "decoder.final_layernorm.weight": torch.randn(64).to(torch.bfloat16),
    }
    writer = dcp.FileSystemWriter(tmp_path / "dcp", single_file_per_rank=request.param)
    planner = DefaultSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
    with warnings.catch_warnings():  # one process on purpose
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state_dict, storage_writer=writer, planner=planner, no_dist=True)
    return tmp_path / "dcp", state_dict


def load_metadata(path):
    with open(path, "rb") as stream:
        return pickle.load(stream)


def test_metadata_is_what_dcp_writes(dcp_checkpoint, tmp_path):
    directory, _ = dcp_checkpoint
    expected = load_metadata(directory / ".metadata")
    tensors = dcp_metadata.metadata_from_dcp(expected)

    dcp_metadata.write_metadata(tmp_path / ".metadata", tensors, checkpoint_id=str(directory))
    written = load_metadata(tmp_path / ".metadata")  # with torch's own classes

    assert type(written) is type(expected)
    assert written.state_dict_metadata == expected.state_dict_metadata
    assert written.storage_data == expected.storage_data
    assert (written.planner_data, written.version) == (expected.planner_data, expected.version)
    assert written.storage_meta.checkpoint_id == str(directory)


def test_metadata_reads_without_torch_as_with_it(dcp_checkpoint):
    directory, state_dict = dcp_checkpoint
    tensors = dcp_metadata.read_metadata(directory / ".metadata")
    assert tensors == dcp_metadata.metadata_from_dcp(load_metadata(directory / ".metadata"))
    assert {tensor.key: (tensor.shape, tensor.dtype) for tensor in tensors} == {
        key: (tuple(value.shape), "BF16") for key, value in state_dict.items()
    }


def test_metadata_naming_other_classes_is_left_to_dcp(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps(torch.nn.Linear))
    with pytest.raises(dcp_metadata.UnknownMetadata):
        dcp_metadata.read_metadata(tmp_path / ".metadata")


def test_regions_read_from_the_file_or_resharded(dcp_checkpoint):
    directory, state_dict = dcp_checkpoint
    (directory / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    reader = DistCheckpointReader(directory)
    embedding = state_dict["embedding.weight"]
    norm = state_dict["decoder.final_layernorm.weight"]

    rows = reader.read("embedding.weight", (10, 0), (20, 64))  # whole rows: in the file
    columns = reader.read("embedding.weight", (10, 8), (20, 16))  # not contiguous: resharded
    norm_part = reader.read("decoder.final_layernorm.weight", (16,), (32,))  # 2nd in its file?

    assert isinstance(columns, MemoryBytes)
    assert columns.data.tobytes() == memory_bytes(embedding[10:30, 8:24]).data.tobytes()
    for source, expected in ((rows, embedding[10:30]), (norm_part, norm[16:48])):
        assert isinstance(source, FileBytes)
        with open(source.path, "rb") as stream:
            stream.seek(source.offset)
            assert stream.read(source.length) == memory_bytes(expected).data.tobytes()


def test_converted_checkpoint_is_laid_out_as_dcp_lays_it_out(megatron_dirs):
    directory = megatron_dirs["llama"]
    metadata = load_metadata(directory / ".metadata")
    files = sorted(path.name for path in directory.glob("*.distcp"))
    assert files == sorted(f"__0_{number}.distcp" for number in range(len(metadata.storage_data)))
    for info in metadata.storage_data.values():
        assert info.offset == 0 and info.length == (directory / info.relative_path).stat().st_size
    assert torch.load(directory / "common.pt", weights_only=True) == {}
    chunks = [
        chunk for tensor in dcp_metadata.metadata_from_dcp(metadata) for chunk in tensor.chunks
    ]
    assert all(isinstance(chunk, StoredChunk) and not chunk.transformed for chunk in chunks)
    assert isinstance(dcp_metadata.read_metadata(directory / ".metadata")[0], StoredTensor)


def test_converting_imports_neither_torch_nor_dcp(hf_model_dirs, tmp_path):
    # Importing torch costs more than converting a 1 GB model; the fast paths do without it.
    script = (
        "import sys\n"
        "from megasft.checkpoint.convert import convert\n"
        f"convert('hf', 'megatron', {str(hf_model_dirs['llama'])!r}, {str(tmp_path / 'm')!r})\n"
        f"convert('megatron', 'hf', {str(tmp_path / 'm')!r}, {str(tmp_path / 'h')!r})\n"
        "print(sorted(name for name in ('torch', 'numpy') if name in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"
