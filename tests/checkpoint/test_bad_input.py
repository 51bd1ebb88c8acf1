"""Bad input is refused with a message naming the problem, and nothing is left half-written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from megasft.checkpoint import safetensors_io, torch_zip
from megasft.checkpoint.convert import convert
from megasft.checkpoint.errors import CheckpointError
from megasft.errors import ConfigError, MegasftError
from tests.checkpoint.tiny_models import assert_bit_exact, read_hf_weights, save_tiny_model


@pytest.fixture
def llama_dir(hf_model_dirs, tmp_path):
    return shutil.copytree(hf_model_dirs["llama"], tmp_path / "llama")


def edit_json(path, **fields):
    content = json.loads(path.read_text())
    content.update(fields)
    path.write_text(json.dumps(content))


def assert_refused(error_type, match, source_format, target_format, source, destination, **kwargs):
    with pytest.raises(error_type, match=match):
        convert(source_format, target_format, source, destination, **kwargs)
    # Nothing at the target, and no staging directory left beside it.
    assert not destination.exists()
    assert not [path for path in destination.parent.iterdir() if ".partial-" in path.name]


def test_unknown_architecture_names_the_field(llama_dir, tmp_path):
    edit_json(llama_dir / "config.json", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    assert_refused(
        ConfigError,
        "model_type 'gpt2' is not supported",
        "hf",
        "megatron",
        llama_dir,
        tmp_path / "out",
    )


def test_unsupported_option_names_the_field(llama_dir, tmp_path):
    edit_json(
        llama_dir / "config.json",
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4},
    )
    assert_refused(
        ConfigError,
        r"rope_parameters.rope_type 'yarn'",
        "hf",
        "megatron",
        llama_dir,
        tmp_path / "out",
    )


def test_missing_shard(tmp_path):
    source = save_tiny_model("llama", tmp_path / "sharded", max_shard_size="50KB")
    shard = sorted(source.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert_refused(
        CheckpointError,
        f"shard '{shard.name}'.*missing",
        "hf",
        "megatron",
        source,
        tmp_path / "out",
    )


def test_truncated_shard(llama_dir, tmp_path):
    weights = llama_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_refused(
        CheckpointError, "truncated or corrupt", "hf", "megatron", llama_dir, tmp_path / "out"
    )


def test_shape_mismatch_between_config_and_weights(llama_dir, tmp_path):
    edit_json(llama_dir / "config.json", intermediate_size=96)
    assert_refused(
        CheckpointError,
        r"has shape \[128, 64\], but config.json implies \[96, 64\]",
        "hf",
        "megatron",
        llama_dir,
        tmp_path / "out",
    )


def test_weights_of_another_family(hf_model_dirs, tmp_path):
    # Qwen2 weights (with QKV biases) under a Llama config.json.
    source = shutil.copytree(hf_model_dirs["qwen2"], tmp_path / "qwen2")
    edit_json(source / "config.json", model_type="llama", architectures=["LlamaForCausalLM"])
    assert_refused(
        CheckpointError,
        r"do not belong to a llama model.*_proj.bias",
        "hf",
        "megatron",
        source,
        tmp_path / "out",
    )


def test_megatron_checkpoint_of_another_family(megatron_dirs, tmp_path):
    checkpoint = shutil.copytree(megatron_dirs["llama"], tmp_path / "checkpoint")
    edit_json(checkpoint / "architecture.json", family="qwen2", qkv_bias=True)
    assert_refused(
        CheckpointError, "linear_qkv.bias", "megatron", "hf", checkpoint, tmp_path / "out"
    )


def test_base_of_another_model(megatron_dirs, hf_model_dirs, tmp_path):
    assert_refused(
        CheckpointError,
        "--base describes another model.*family",
        "megatron",
        "hf",
        megatron_dirs["llama"],
        tmp_path / "out",
        base=hf_model_dirs["qwen3"],
    )


def test_existing_target_is_refused_and_kept(megatron_dirs, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        convert("megatron", "hf", megatron_dirs["llama"], target)
    assert [path.name for path in target.iterdir()] == ["keep.txt"]


def test_not_a_megatron_checkpoint(hf_model_dirs, tmp_path):
    assert_refused(
        CheckpointError,
        "no architecture.json",
        "megatron",
        "hf",
        hf_model_dirs["llama"],
        tmp_path / "out",
    )


def disk_full_after(writes: int, copy):
    """`copy` (a byte-copying function), failing as a full disk does after `writes` calls."""
    done = []

    def copy_until_disk_full(destination, sources):
        if len(done) == writes:
            raise OSError("disk full")
        done.append(sources)
        return copy(destination, sources)

    return copy_until_disk_full


def test_failure_while_writing_leaves_nothing(llama_dir, tmp_path, monkeypatch):
    # Some chunk files are complete when the disk fills up.
    monkeypatch.setattr(
        torch_zip,
        "copy_bytes_with_crc32",
        disk_full_after(3, torch_zip.copy_bytes_with_crc32),
    )
    assert_refused(OSError, "disk full", "hf", "megatron", llama_dir, tmp_path / "out")


def test_failure_while_exporting_leaves_nothing(megatron_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_io, "copy_bytes", disk_full_after(3, safetensors_io.copy_bytes))
    assert_refused(OSError, "disk full", "megatron", "hf", megatron_dirs["llama"], tmp_path / "out")


def test_pytorch_bin_needs_the_flag_and_loads_weights_only(llama_dir, tmp_path):
    weights = load_file(llama_dir / "model.safetensors")
    (llama_dir / "model.safetensors").unlink()
    torch.save(weights, llama_dir / "pytorch_model.bin")
    assert_refused(
        CheckpointError, "--allow-pytorch-bin", "hf", "megatron", llama_dir, tmp_path / "out"
    )

    convert("hf", "megatron", llama_dir, tmp_path / "megatron", allow_pytorch_bin=True)
    convert("megatron", "hf", tmp_path / "megatron", tmp_path / "hf")
    assert_bit_exact(weights, read_hf_weights(tmp_path / "hf"))


def test_pickle_with_code_is_refused(llama_dir, tmp_path):
    (llama_dir / "model.safetensors").unlink()
    torch.save(
        {"model.embed_tokens.weight": torch.zeros(1), "hook": print},
        llama_dir / "pytorch_model.bin",
    )
    assert_refused(
        CheckpointError,
        r"weights_only=True",
        "hf",
        "megatron",
        llama_dir,
        tmp_path / "out",
        allow_pytorch_bin=True,
    )


def test_every_error_is_a_megasft_error():
    assert issubclass(CheckpointError, MegasftError)
