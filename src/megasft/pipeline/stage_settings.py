"""Each stage's settings out of its pipeline section: the keyword arguments of the stage's
config class, without the keys the pipeline wires in, KFP's doubles made whole again.

See docs/pipeline.md, "Run configurations".
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megasft.errors import ConfigError

# Settings each section owns beside its stage's own, and stage settings the pipeline sets itself
# (inputs and outputs are artifacts, wired by the pipeline).
_DATA_OWN = {"path"}
_DATA_WIRED = {"inputs", "tokenizer", "output", "overwrite", "progress", "workers"}
TRAIN_WIRED = {"data", "load", "save"}
"""The TrainConfig settings the pipeline wires in (its artifacts), not the `train` section."""
_TRAIN_OWN = {"recipe", "device", "device_memory"}
"""Keys of the `train` section beside TrainConfig's: the recipe, and the GPU the run's memory
is planned for (`megasft plan --device` / `--device-memory GIB`)."""
_EVALUATE_OWN = {"data"}
_EVALUATE_WIRED = {"model", "output", "baseline", "val_data", "tokenizer", "convert_base"}


def prepare_settings(data: dict[str, Any]) -> dict[str, Any]:
    """The `data` section as PrepareConfig keyword arguments (inputs and outputs are wired).

    Args:
        data: the `data` section.

    Returns:
        The settings, integers and column map pairs restored.

    Raises:
        ConfigError: a key PrepareConfig does not take.
    """
    from megasft.data.config import PrepareConfig

    settings = {key: value for key, value in data.items() if key not in _DATA_OWN}
    check_keys("data", settings, field_names(PrepareConfig) - _DATA_WIRED, _DATA_OWN)
    return _with_column_map_pairs(_with_whole_numbers(PrepareConfig, settings))


def train_settings(train: dict[str, Any], read_recipe: bool = True) -> dict[str, Any]:
    """The `train` section as TrainConfig keyword arguments: a recipe's values, then the
    section's own (data, load and save are wired; device and device_memory are the plan's).

    Args:
        train: the `train` section.
        read_recipe: read the recipe file the section names.

    Returns:
        The settings, integers restored.

    Raises:
        ConfigError: a key TrainConfig does not take, or a recipe that cannot be read.
    """
    from megasft.train.config import TrainConfig, load_recipe

    settings = {key: value for key, value in train.items() if key not in _TRAIN_OWN}
    recipe = train.get("recipe")
    values = load_recipe(recipe) if recipe and read_recipe else {}
    values.update(settings)
    if isinstance(values.get("peft"), dict):
        values.update(_peft_settings(values.pop("peft")))
    check_keys("train", values, field_names(TrainConfig) - TRAIN_WIRED, _TRAIN_OWN)
    return _with_whole_numbers(TrainConfig, values)


_PEFT_KEYS = {
    "method": "peft",
    "rank": "lora_rank",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "targets": "lora_targets",
}
"""train.peft's keys -> the TrainConfig settings they set (--peft, --lora-*)."""


def _peft_settings(peft: dict[str, Any]) -> dict[str, Any]:
    """`train.peft: {method: lora, rank: 16, ...}` as TrainConfig settings."""
    unknown = sorted(set(peft) - set(_PEFT_KEYS))
    if unknown:
        raise ConfigError(
            f"train.peft: unknown key(s) {', '.join(unknown)}; known: {', '.join(_PEFT_KEYS)}"
        )
    if "method" not in peft:
        raise ConfigError("train.peft: name the method, e.g. method: lora")
    settings = {_PEFT_KEYS[key]: value for key, value in peft.items()}
    if isinstance(settings.get("lora_targets"), list):
        settings["lora_targets"] = ",".join(settings["lora_targets"])
    return settings


def evaluate_settings(evaluate: dict[str, Any]) -> dict[str, Any]:
    """The `evaluate` section as EvaluateConfig keyword arguments, its own `data` (the
    prompts) included (the models and outputs are wired).

    Args:
        evaluate: the `evaluate` section.

    Returns:
        The settings, integers and column map pairs restored.

    Raises:
        ConfigError: a key EvaluateConfig does not take.
    """
    from megasft.evaluate.config import EvaluateConfig

    settings = dict(evaluate)
    check_keys("evaluate", settings, field_names(EvaluateConfig) - _EVALUATE_WIRED, _EVALUATE_OWN)
    return _with_column_map_pairs(_with_whole_numbers(EvaluateConfig, settings))


def _with_whole_numbers(config_class: type, settings: dict[str, Any]) -> dict[str, Any]:
    """Integer settings back from floats: KFP passes a dict parameter as a protobuf Struct,
    whose numbers are all doubles, so `nproc: 2` arrives in the step as 2.0."""
    import typing

    hints = typing.get_type_hints(config_class)
    for key, value in settings.items():
        wants_int = hints.get(key) in (int, int | None)
        if wants_int and isinstance(value, float) and value.is_integer():
            settings[key] = int(value)
    return settings


def _with_column_map_pairs(settings: dict[str, Any]) -> dict[str, Any]:
    """YAML writes a column map as a mapping; the stage configs take (field, column) pairs."""
    if isinstance(settings.get("column_map"), dict):
        settings["column_map"] = tuple(settings["column_map"].items())
    return settings


def field_names(config_class: type) -> set[str]:
    """The field names of a config dataclass.

    Args:
        config_class: the dataclass.

    Returns:
        Its fields' names.
    """
    return {f.name for f in dataclasses.fields(config_class)}


def check_keys(
    section: str, values: dict[str, Any], allowed: set[str], extra: set[str] = frozenset()
) -> None:
    """Refuse settings a section does not take, naming them and the known ones.

    Args:
        section: the section's name (named in the error).
        values: the section's settings.
        allowed: the settings the stage takes.
        extra: the section's own settings beside those.

    Raises:
        ConfigError: an unknown setting.
    """
    unknown = sorted(set(values) - allowed - extra)
    if unknown:
        raise ConfigError(
            f"{section}: unknown setting(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(allowed | extra))}"
        )
