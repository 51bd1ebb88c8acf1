"""The files of a megasft megatron checkpoint directory, and the HF files carried along.

`MCORE_DIR/` holds the `dist_checkpointing` checkpoint itself, `architecture.json` and `hf/`
(the source model's config and tokenizer files). The tree and what reads it: docs/convert.md,
"The two sides". The names every layer needs live in `megasft.constants`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from megasft.constants import ARCHITECTURE_FILE, HF_CONFIG_FILE, HF_FILES_DIR

__all__ = [
    "ARCHITECTURE_FILE",
    "DEFAULT_MAX_SHARD_BYTES",
    "FORMATS",
    "GENERATION_CONFIG_FILE",
    "HF_CONFIG_FILE",
    "HF_FILES_DIR",
    "HF_METADATA_FILES",
    "TOKENIZER_FILES",
    "copy_hf_metadata_files",
]

FORMATS = ("hf", "megatron")
"""The two sides of a conversion."""
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
"""The size above which exported safetensors are sharded."""

GENERATION_CONFIG_FILE = "generation_config.json"

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
"""Tokenizer files copied between the HF and megatron sides, when present."""

HF_METADATA_FILES = (HF_CONFIG_FILE, GENERATION_CONFIG_FILE, *TOKENIZER_FILES)


def copy_hf_metadata_files(source: Path, destination: Path) -> list[str]:
    """Copy the config, generation config and tokenizer files that exist in `source`.

    Args:
        source: an HF model directory.
        destination: where the copies go (created if missing).

    Returns:
        The names copied.
    """
    destination.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in HF_METADATA_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, destination / name)
            copied.append(name)
    return copied


TRAIN_STATE_FILE = "train_state.json"


def peft_settings_of(checkpoint: Path) -> dict[str, Any] | None:
    """The `peft` entry of a training checkpoint's train_state.json.

    Kept here, without torch, so that `convert` can tell a PEFT run from a full model without
    importing torch on its fast paths.

    Args:
        checkpoint: an `iter_*` checkpoint directory.

    Returns:
        The run's PEFT settings, or None when it is not a PEFT run (or not a training checkpoint).
    """
    state_file = checkpoint / TRAIN_STATE_FILE
    if not state_file.is_file():
        return None
    return json.loads(state_file.read_text()).get("peft")
