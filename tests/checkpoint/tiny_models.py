"""Tiny random Hugging Face models of every supported family, built here (nothing is downloaded).

Each has 2 layers, hidden size 64, 4 query heads in 2 key/value groups (GQA) and a vocabulary
of 100, which is not a multiple of the 128-row vocabulary padding, so padding is exercised.
Norm weights and biases are randomised too (HF initialises them to ones and zeros, which would
hide a swapped or dropped tensor), and MoE routers are scaled up so that each token's experts
are chosen by clear margins and vary from token to token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

VOCAB_SIZE = 100
SEQUENCE_LENGTH = 40

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


@dataclass(frozen=True)
class TinyModel:
    """One test model: a name, its transformers classes and the config fields it adds."""

    name: str
    model_class: type[PreTrainedModel]
    config_class: type
    config_fields: dict[str, Any] = field(default_factory=dict)

    def build(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
        torch.manual_seed(seed)
        config = self.config_class(**_COMMON, **self.config_fields)
        config._attn_implementation = "eager"
        model = self.model_class(config).eval()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "norm" in name:
                    parameter.normal_(1.0, 0.1)
                elif name.endswith("bias"):
                    parameter.normal_(0.0, 0.1)
                elif name.endswith(".gate.weight"):  # an MoE router
                    parameter.normal_(0.0, 0.3)
        return model.to(dtype)


TINY_MODELS = {
    model.name: model
    for model in (
        TinyModel("llama", LlamaForCausalLM, LlamaConfig),
        TinyModel(
            "llama3",
            LlamaForCausalLM,
            LlamaConfig,
            # Llama 3.1 RoPE scaling with an original context short enough that the
            # scaled, kept and interpolated frequency bands all occur at head_dim 16.
            dict(
                rope_theta=500000.0,
                rope_scaling=dict(
                    rope_type="llama3",
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=64,
                ),
            ),
        ),
        TinyModel("llama_tied", LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=True)),
        # A window shorter than the test sequence, so that it matters.
        TinyModel("mistral", MistralForCausalLM, MistralConfig, dict(sliding_window=8)),
        TinyModel("qwen2", Qwen2ForCausalLM, Qwen2Config),
        # Qwen3 decouples head_dim from hidden_size / heads.
        TinyModel("qwen3", Qwen3ForCausalLM, Qwen3Config, dict(head_dim=32)),
        # Top-2 of 4 experts on every layer, renormalised as Qwen3-30B-A3B does.
        TinyModel(
            "qwen3_moe",
            Qwen3MoeForCausalLM,
            Qwen3MoeConfig,
            dict(head_dim=32, **_MOE, norm_topk_prob=True),
        ),
        # A dense first layer (mlp_only_layers) and top-2 weights as the softmax gave them.
        TinyModel(
            "qwen3_moe_dense",
            Qwen3MoeForCausalLM,
            Qwen3MoeConfig,
            dict(**_MOE, norm_topk_prob=False, mlp_only_layers=[0]),
        ),
        # Top-2 of 4 experts of intermediate_size, with a window shorter than the sequence.
        TinyModel(
            "mixtral",
            MixtralForCausalLM,
            MixtralConfig,
            dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=16),
        ),
    )
}


def write_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over VOCAB_SIZE tokens, as tokenizer.json + tokenizer_config.json."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB_SIZE)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def save_tiny_model(
    name: str,
    directory: Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
) -> Path:
    """Save TINY_MODELS[name] (with a tokenizer) as a Hugging Face directory."""
    model = TINY_MODELS[name].build(dtype=dtype)
    if max_shard_size is None:
        model.save_pretrained(directory)
    else:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
    write_tokenizer(directory)
    return directory


def sample_tokens(seed: int = 0, batch_size: int = 2) -> torch.Tensor:
    """[b, s] token ids shared by the HF and megatron sides of the parity tests."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB_SIZE, (batch_size, SEQUENCE_LENGTH), generator=generator)


def read_hf_weights(directory) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    files = (
        sorted({directory / name for name in json.loads(index.read_text())["weight_map"].values()})
        if index.exists()
        else [directory / "model.safetensors"]
    )
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[name] = handle.get_tensor(name)
    return tensors


def assert_bit_exact(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name
