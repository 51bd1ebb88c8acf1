"""The family registry: every supported family is registered against its HF names, a new
family is one registered class, and no module outside the family modules names a family."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

import megasft
from megasft.checkpoint import mappings
from megasft.errors import ConfigError
from megasft.megatron import families
from megasft.megatron.architecture import architecture_from_hf_config, hf_config_from_architecture
from megasft.megatron.families import registry
from megasft.megatron.families.weight_mapping import HF_LAYER, MEGATRON_LAYER, Rename
from megasft.megatron.hf_config import ConfigReader
from tests.checkpoint.tiny_models import TINY_MODELS

SOURCE = Path(megasft.__file__).parent
FAMILY_MODULES = SOURCE / "megatron" / "families"


def test_the_six_families_are_registered_by_model_type():
    assert families.names() == ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe")


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_each_family_names_the_transformers_class_of_its_models(name):
    model = TINY_MODELS[name].build()
    family = families.family_named(model.config.model_type)
    assert family.hf_architecture_class == type(model).__name__


def test_an_unknown_family_is_refused_with_the_supported_ones():
    with pytest.raises(ConfigError, match="'gpt2' is not supported; supported: llama, mistral"):
        families.family_named("gpt2")


def test_a_family_registers_once():
    with pytest.raises(ValueError, match="'llama' is registered twice"):
        registry.register(type(families.family_named("llama")))


def test_a_new_family_is_one_registered_class(monkeypatch):
    # What a new family module holds: its names, what it reads, its extra weights.
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    post_norm = Rename(
        f"{MEGATRON_LAYER}.self_attention.q_layernorm.weight",
        f"{HF_LAYER}.self_attn.q_norm.weight",
    )

    @registry.register
    class Toy(families.ModelFamily):
        model_type = "toy"
        hf_architecture_class = "ToyForCausalLM"

        def architecture_fields(self, config: ConfigReader) -> dict[str, Any]:
            return super().architecture_fields(config) | {"qk_layernorm": True}

        def hf_config_fields(self, architecture) -> dict[str, Any]:
            return {}

        def weight_mappings(self, architecture):
            return (*super().weight_mappings(architecture), post_norm)

    config = TINY_MODELS["llama"].build().config.to_dict()
    config |= {"model_type": "toy", "architectures": ["ToyForCausalLM"]}
    architecture = architecture_from_hf_config(config)
    assert (architecture.family, architecture.qk_layernorm) == ("toy", True)
    assert mappings.mappings_for(architecture)[-1] == post_norm
    assert mappings.megatron_shape(post_norm, architecture) == (architecture.head_dim,)
    assert architecture_from_hf_config(hf_config_from_architecture(architecture)) == architecture


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("llama", {"add_qkv_bias": False, "qk_layernorm": False, "window_size": None}),
        ("qwen2", {"add_qkv_bias": True, "qk_layernorm": False, "window_size": None}),
        ("qwen3", {"add_qkv_bias": False, "qk_layernorm": True, "window_size": None}),
        ("mistral", {"add_qkv_bias": False, "qk_layernorm": False, "window_size": (7, 0)}),
        ("qwen3_moe", {"add_qkv_bias": False, "qk_layernorm": True, "window_size": None}),
        ("mixtral", {"add_qkv_bias": False, "qk_layernorm": False, "window_size": (15, 0)}),
    ],
)
def test_each_family_sets_its_megatron_core_fields(name, expected):
    import torch.nn.functional as F

    architecture = architecture_from_hf_config(TINY_MODELS[name].build().config.to_dict())
    fields = families.family_named(name).transformer_config_fields(architecture)
    assert {key: fields[key] for key in expected} == expected
    assert (fields["normalization"], fields["activation_func"]) == ("RMSNorm", F.silu)


def _string_constants(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        if id(node) not in docstrings
    }


def test_no_module_outside_the_family_modules_names_a_family():
    offenders = {
        f"{path.relative_to(SOURCE)}: {name!r}"
        for path in SOURCE.rglob("*.py")
        if FAMILY_MODULES not in path.parents
        for name in _string_constants(path) & set(families.names())
    }
    assert not offenders
