"""Tiny Hugging Face models, randomly initialised here for the demos.

The demo's base model is a Llama (`build_tiny_llama`), demo-moe's a Qwen3-MoE
(`build_tiny_qwen3_moe`): the same on-disk form as a real Hugging Face checkpoint
(config.json, safetensors, the tokenizer files), so every stage reads them the way it reads
Llama 2 or Qwen3-30B-A3B.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_tiny_llama(
    directory: str | Path,
    tokenizer_dir: str | Path,
    hidden_size: int = 128,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 1024,
    seed: int = 0,
) -> Path:
    """Writes a random `LlamaForCausalLM` sized to the tokenizer's vocabulary; returns its path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory, tokenizer_dir = Path(directory), Path(tokenizer_dir)
    config = LlamaConfig(
        **_decoder_fields(tokenizer_dir, hidden_size, layers, heads, kv_heads, max_positions)
    )
    return _save(LlamaForCausalLM, config, seed, directory, tokenizer_dir)


def build_tiny_qwen3_moe(
    directory: str | Path,
    tokenizer_dir: str | Path,
    hidden_size: int = 128,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    experts: int = 8,
    experts_per_token: int = 2,
    max_positions: int = 1024,
    seed: int = 0,
) -> Path:
    """Writes a random `Qwen3MoeForCausalLM` sized to the tokenizer's vocabulary: every layer an
    MoE block of `experts` experts, each a third as wide as the Llama's MLP, so that the
    `experts_per_token` active ones cost about what that MLP does; returns its path."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    directory, tokenizer_dir = Path(directory), Path(tokenizer_dir)
    config = Qwen3MoeConfig(
        **_decoder_fields(tokenizer_dir, hidden_size, layers, heads, kv_heads, max_positions),
        moe_intermediate_size=hidden_size,
        num_experts=experts,
        num_experts_per_tok=experts_per_token,
        norm_topk_prob=True,
        router_aux_loss_coef=0.001,
        head_dim=hidden_size // heads,
    )
    return _save(Qwen3MoeForCausalLM, config, seed, directory, tokenizer_dir)


def _decoder_fields(
    tokenizer_dir: Path,
    hidden_size: int,
    layers: int,
    heads: int,
    kv_heads: int,
    max_positions: int,
) -> dict:
    """The Hugging Face config fields both demo models share: the decoder's sizes, an MLP 3x
    the hidden size, RoPE, untied embeddings, and the tokenizer's vocabulary and special ids."""
    vocab_size, eos_id, pad_id = _token_ids(tokenizer_dir)
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def _token_ids(tokenizer_dir: Path) -> tuple[int, int, int]:
    """(vocabulary size, eos id, pad id) of a tokenizer directory; pad falls back to eos."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    eos_id = tokenizer.token_to_id(tokenizer_config["eos_token"])
    pad_token = tokenizer_config.get("pad_token")
    pad_id = tokenizer.token_to_id(pad_token) if pad_token else eos_id
    return tokenizer.get_vocab_size(with_added_tokens=True), eos_id, pad_id


def _save(model_class, config, seed: int, directory: Path, tokenizer_dir: Path) -> Path:
    """A `model_class` randomly initialised from `seed`, a greedy generation config and the
    tokenizer files, into `directory`."""
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    model_class(config).save_pretrained(directory)
    GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, do_sample=False
    ).save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory
