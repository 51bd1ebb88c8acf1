"""Launchers: where a pipeline's training runs, picked by `launcher.kind` from a registry.

A launcher is a frozen dataclass of its settings (the pipeline config's `launcher` section, less
`kind`), checked on construction, with `run(plan) -> summary`. Each lives in a module of
`megasft.launch` and registers itself with `@register_launcher`; the registry imports those
modules on first use, so a new launcher is one new module (docs/train.md, "Launchers").
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from megasft.errors import ConfigError

DEFAULT_KIND = "local"


@dataclass(frozen=True)
class TrainingPlan:
    """One training run of the pipeline, as its train step hands it to the launcher."""

    settings: Mapping[str, Any]
    """TrainConfig keyword arguments, less the wired inputs and output (data, load, save)."""
    dataset: Path
    """The prepared dataset (`megasft prepare`'s output)."""
    base_checkpoint: Path
    """The converted megatron checkpoint to start from."""
    output: Path
    """Where the final checkpoint, summary.json and metrics.jsonl end up."""
    run_id: str
    """The pipeline run's id: a retried step finds what its earlier attempt left."""


@dataclass(frozen=True)
class Layout:
    """The training processes a launcher runs, and the settings that say so (for messages)."""

    per_node: int
    """Processes (GPUs) on each node."""
    nodes: int
    per_node_setting: str
    """E.g. `launcher.gpus_per_node`, or `train.nproc` where the train settings decide."""
    nodes_setting: str


class Launcher(Protocol):
    """Runs a TrainingPlan somewhere; its dataclass fields are its settings."""

    kind: ClassVar[str]
    """The `launcher.kind` that picks it."""
    runs_in_step: ClassVar[bool]
    """True when training runs in the step's own process (what `pipeline run-local` needs)."""

    def layout(self, settings: Mapping[str, Any]) -> Layout:
        """The processes per node and nodes that a run of these train settings gets."""
        ...

    def run(self, plan: TrainingPlan) -> dict[str, Any]:
        """Trains (or resumes) `plan`; returns the training summary (summary.json)."""
        ...


_LAUNCHERS: dict[str, type] = {}
_discovered = False
LauncherType = TypeVar("LauncherType", bound=type)


def register_launcher(cls: LauncherType) -> LauncherType:
    """Class decorator: makes `cls` the launcher of `launcher.kind: cls.kind`."""
    if cls.kind in _LAUNCHERS and _LAUNCHERS[cls.kind] is not cls:
        raise ValueError(f"two launchers of kind {cls.kind!r}: {_LAUNCHERS[cls.kind]} and {cls}")
    _LAUNCHERS[cls.kind] = cls
    return cls


def launcher_classes() -> dict[str, type]:
    """Every registered launcher by kind, in the order of their names."""
    global _discovered
    if not _discovered:
        import megasft.launch

        for module in pkgutil.iter_modules(megasft.launch.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"megasft.launch.{module.name}")
        _discovered = True
    return dict(sorted(_LAUNCHERS.items()))


def launcher_from_settings(section: Mapping[str, Any] | Launcher) -> Launcher:
    """The launcher that a pipeline config's `launcher` section describes.

    Args:
        section: `kind` (default "local") and that launcher's settings. Settings of the other
            launchers are accepted and left unused, so that `--set launcher.kind=local` runs a
            cluster configuration on this machine. Whole-number floats (as KFP passes every
            number of a dict parameter) become integers where the setting is one. A launcher
            is returned as it is.

    Returns:
        The launcher, its settings checked.

    Raises:
        ConfigError: for an unknown kind or setting, or a setting the launcher refuses.
    """
    classes = launcher_classes()
    if isinstance(section, tuple(classes.values())):
        return section
    if not isinstance(section, Mapping):
        raise ConfigError("launcher: expected a mapping of settings")
    known = {"kind"}.union(*({f.name for f in dataclasses.fields(c)} for c in classes.values()))
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(
            f"launcher: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    kind = section.get("kind", DEFAULT_KIND)
    if kind not in classes:
        raise ConfigError(f"launcher.kind {kind!r}: use one of {', '.join(classes)}")
    cls = classes[kind]
    hints = typing.get_type_hints(cls)
    settings = {}
    for field in dataclasses.fields(cls):
        if field.name in section:
            value = section[field.name]
            if hints[field.name] in (int, int | None) and isinstance(value, float):
                value = int(value) if value.is_integer() else value
            settings[field.name] = value
    return cls(**settings)


def launcher_section(launcher: Launcher) -> dict[str, Any]:
    """The saved form of a launcher: `kind` and the settings that are set (not None)."""
    values = {field.name: getattr(launcher, field.name) for field in dataclasses.fields(launcher)}
    return {
        "kind": launcher.kind,
        **{key: value for key, value in values.items() if value is not None},
    }


def check_layout(launcher: Launcher, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The train settings with `nproc` and `nodes` as `launcher` runs them, checked against the
    parallel sizes: the GPUs (per node x nodes) make the world size TP x PP x CP x DP, so TP x PP x
    CP must divide them (DP is what is left), and for an MoE model's expert layers
    ETP x EP x expert-DP x PP, so ETP x EP x PP must divide them too.

    Args:
        launcher: where the run trains.
        settings: TrainConfig keyword arguments (the pipeline's `train` section).

    Returns:
        `settings` with `nproc` and `nodes` set from the launcher's layout.

    Raises:
        ConfigError: naming the settings, when `train.nproc` or `train.nodes` disagree with the
            launcher's, or when the model-parallel sizes do not divide the GPUs.
    """
    from megasft.train.config import TrainConfig

    layout = launcher.layout(settings)
    for key, value, setting in (
        ("nproc", layout.per_node, layout.per_node_setting),
        ("nodes", layout.nodes, layout.nodes_setting),
    ):
        given = settings.get(key)
        if given is not None and given != value and setting != f"train.{key}":
            raise ConfigError(
                f"train.{key} {given} differs from {setting} {value}; on a cluster there is one "
                f"training process per GPU: leave train.{key} out (it is set from {setting})"
            )
    defaults = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
    sizes = {
        setting: settings.get(setting) or defaults[setting]
        for setting in ("tensor_parallel", "pipeline_parallel", "context_parallel")
    }
    world = layout.per_node * layout.nodes
    _require_divides(
        world, layout, sizes, "the world size must be TP x PP x CP x DP",
        "change the GPUs or the parallel sizes so that it does (DP, data parallelism, is what "
        "is left)",
    )  # fmt: skip
    experts = {
        "expert_tensor_parallel": settings.get("expert_tensor_parallel")
        or sizes["tensor_parallel"],
        "expert_parallel": settings.get("expert_parallel") or defaults["expert_parallel"],
        "pipeline_parallel": sizes["pipeline_parallel"],
    }
    _require_divides(
        world, layout, experts, "the expert layers split them as ETP x EP x expert-DP x PP",
        "change the GPUs or the expert parallel sizes so that it does",
    )  # fmt: skip
    return {**settings, "nproc": layout.per_node, "nodes": layout.nodes}


def _require_divides(world: int, layout, sizes: dict[str, int], grid: str, advice: str) -> None:
    """Raises ConfigError naming the settings when their product does not divide the GPUs."""
    product = math.prod(sizes.values())
    if world % product:
        named = " x ".join(f"train.{setting} {size}" for setting, size in sizes.items())
        raise ConfigError(
            f"{layout.per_node_setting} {layout.per_node} x {layout.nodes_setting} "
            f"{layout.nodes} = {world} GPUs, but {grid} and {named} = {product} does not "
            f"divide {world}: {advice}"
        )
