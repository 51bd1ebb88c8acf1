"""A tiny Llama-architecture Hugging Face model, randomly initialised here for the demo.

The demo's base model: the same on-disk form as a real Hugging Face checkpoint (config.json,
safetensors, the tokenizer files), so every stage reads it the way it reads Llama 2.
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
    import torch
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    directory, tokenizer_dir = Path(directory), Path(tokenizer_dir)
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    eos_id = tokenizer.token_to_id(tokenizer_config["eos_token"])
    pad_token = tokenizer_config.get("pad_token")
    pad_id = tokenizer.token_to_id(pad_token) if pad_token else eos_id

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
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
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False).save_pretrained(
        directory
    )
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory
