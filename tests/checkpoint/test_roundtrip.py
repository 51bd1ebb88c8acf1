"""HF -> megatron -> HF is lossless for every family, and the result is a usable HF model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megasft.checkpoint.convert import convert
from megasft.megatron.architecture import ModelArchitecture
from tests.checkpoint.tiny_models import (
    TINY_MODELS,
    VOCAB_SIZE,
    assert_bit_exact,
    read_hf_weights,
    save_tiny_model,
)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_round_trip_is_bit_exact_and_keeps_bf16(name, bf16_hf_model_dirs, tmp_path):
    source = bf16_hf_model_dirs[name]
    convert("hf", "megatron", source, tmp_path / "megatron")
    # A small shard size forces several shards and an index.
    convert("megatron", "hf", tmp_path / "megatron", tmp_path / "hf", max_shard_bytes=40_000)

    original = read_hf_weights(source)
    assert {tensor.dtype for tensor in original.values()} == {torch.bfloat16}
    assert_bit_exact(original, read_hf_weights(tmp_path / "hf"))
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1


def test_converted_model_loads_in_transformers_with_its_tokenizer(bf16_hf_model_dirs, tmp_path):
    source = bf16_hf_model_dirs["qwen2"]
    convert("hf", "megatron", source, tmp_path / "megatron")
    convert("megatron", "hf", tmp_path / "megatron", tmp_path / "hf")

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.dtype == torch.bfloat16
    reference = AutoModelForCausalLM.from_pretrained(source)
    tokens = torch.tensor([[1, 5, 17, 42, 99]])
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)
    text = "w5 w17 w3"
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "hf")(text).input_ids
        == AutoTokenizer.from_pretrained(source)(text).input_ids
    )
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (tmp_path / "hf" / name).read_bytes() == (source / name).read_bytes()


def test_megatron_side_records_architecture_padding_and_hf_files(megatron_dirs, hf_model_dirs):
    directory = megatron_dirs["qwen3"]
    architecture = ModelArchitecture.load(directory / "architecture.json")
    assert architecture.family == "qwen3"
    assert (architecture.vocab_size, architecture.padded_vocab_size) == (VOCAB_SIZE, 128)
    assert (architecture.head_dim, architecture.qk_layernorm, architecture.qkv_bias) == (
        32,
        True,
        False,
    )
    assert json.loads((directory / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (directory / "hf" / name).read_bytes() == (
            hf_model_dirs["qwen3"] / name
        ).read_bytes()


def test_sharded_hf_source_is_read_through_its_index(tmp_path):
    source = save_tiny_model("llama", tmp_path / "sharded", max_shard_size="50KB")
    assert (source / "model.safetensors.index.json").is_file()
    convert("hf", "megatron", source, tmp_path / "megatron")
    convert("megatron", "hf", tmp_path / "megatron", tmp_path / "hf")
    assert_bit_exact(read_hf_weights(source), read_hf_weights(tmp_path / "hf"))


def test_base_supplies_config_and_tokenizer(megatron_dirs, hf_model_dirs, tmp_path):
    # A checkpoint without its stored HF files (as a trainer might write it) plus --base.
    import shutil

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(megatron_dirs["llama"], checkpoint)
    shutil.rmtree(checkpoint / "hf")
    convert("megatron", "hf", checkpoint, tmp_path / "hf", base=hf_model_dirs["llama"])
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert (tmp_path / "hf" / "config.json").read_bytes() == (
        hf_model_dirs["llama"] / "config.json"
    ).read_bytes()


def test_without_stored_config_one_is_written_from_the_architecture(
    megatron_dirs, hf_model_dirs, tmp_path
):
    import shutil

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(megatron_dirs["llama3"], checkpoint)
    shutil.rmtree(checkpoint / "hf")
    convert("megatron", "hf", checkpoint, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    reference = AutoModelForCausalLM.from_pretrained(hf_model_dirs["llama3"])
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6] * 10])
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)
