"""The registry of model families, by Hugging Face `model_type`.

A family module decorates its `ModelFamily` subclass with `@register`; the package imports
every family module, so the registry is complete once `megasft.megatron.families` is imported.
"""

from __future__ import annotations

from typing import TypeVar

from megasft.errors import ConfigError
from megasft.megatron.families.base import ModelFamily

_FAMILIES: dict[str, ModelFamily] = {}

FamilyClass = TypeVar("FamilyClass", bound=type[ModelFamily])


def register(family_class: FamilyClass) -> FamilyClass:
    """Class decorator: register one instance of `family_class` under its `model_type`.

    Args:
        family_class: a `ModelFamily` subclass with `model_type` and `hf_architecture_class`.

    Returns:
        `family_class`, unchanged.

    Raises:
        ValueError: another family already has that `model_type`.
    """
    name = family_class.model_type
    if name in _FAMILIES:
        raise ValueError(f"model family {name!r} is registered twice")
    _FAMILIES[name] = family_class()
    return family_class


def names() -> tuple[str, ...]:
    """The `model_type`s of the registered families, sorted.

    Returns:
        The names, e.g. ("llama", "mistral", "qwen2", "qwen3").
    """
    return tuple(sorted(_FAMILIES))


def family_named(name: str) -> ModelFamily:
    """The family registered under `name` (a `model_type`, or `ModelArchitecture.family`).

    Args:
        name: the family's `model_type`.

    Returns:
        The family.

    Raises:
        ConfigError: no family has that name.
    """
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ConfigError(
            f"model family {name!r} is not supported; supported: {', '.join(names())}"
        ) from None
