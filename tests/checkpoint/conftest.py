from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megasft.checkpoint.convert import convert
from tests.checkpoint.tiny_models import TINY_MODELS, save_tiny_model


@pytest.fixture(scope="session")
def hf_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Every tiny model as an fp32 Hugging Face directory, by name."""
    root = tmp_path_factory.mktemp("hf")
    return {name: save_tiny_model(name, root / name) for name in TINY_MODELS}


@pytest.fixture(scope="session")
def megatron_dirs(hf_model_dirs, tmp_path_factory) -> dict[str, Path]:
    """Every tiny model converted to a megatron checkpoint, by name."""
    root = tmp_path_factory.mktemp("megatron")
    for name, source in hf_model_dirs.items():
        convert("hf", "megatron", source, root / name)
    return {name: root / name for name in hf_model_dirs}


@pytest.fixture(scope="session")
def bf16_hf_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-bf16")
    return {name: save_tiny_model(name, root / name, dtype=torch.bfloat16) for name in TINY_MODELS}
