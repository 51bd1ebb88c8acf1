"""Named run configurations of the SFT pipeline (pipelines/configs/*.yaml).

A run configuration is one YAML file with a section per stage (`data`, `model`, `train`,
`launcher`, `evaluate`, `tracking`, `notify`), each holding that stage's own settings; the
pipeline takes the sections as its parameters, one dict each. `PipelineConfig(...)` checks the
shape; `check_inputs()` checks what needs the files (and, when the `train` section names its
GPU, that the run fits in its memory), in the pipeline's first step and before
`megasft pipeline run-local` starts. See docs/pipeline.md, "Run configurations".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megasft.errors import ConfigError, InputError
from megasft.launch.registry import Launcher, launcher_from_settings, launcher_section
from megasft.pipeline.sections import NotifyConfig, TrackingConfig
from megasft.pipeline.stage_settings import (
    TRAIN_WIRED,
    check_keys,
    evaluate_settings,
    field_names,
    prepare_settings,
    train_settings,
)

_MODEL_KEYS = {"path", "tokenizer"}
"""The settings of the `model` section (it has no stage of its own)."""


def tracking_config(section: Mapping[str, Any] | TrackingConfig) -> TrackingConfig:
    """The `tracking` section, typed and checked.

    Args:
        section: its settings as the YAML file or the pipeline parameter has them.

    Returns:
        The TrackingConfig.

    Raises:
        ConfigError: not a mapping, an unknown key or a bad value; the message names it.
    """
    return _typed_section(TrackingConfig, "tracking", section)


def notify_config(section: Mapping[str, Any] | NotifyConfig) -> NotifyConfig:
    """The `notify` section, typed and checked.

    Args:
        section: its settings as the YAML file or the pipeline parameter has them.

    Returns:
        The NotifyConfig.

    Raises:
        ConfigError: not a mapping, an unknown key or a bad value; the message names it.
    """
    return _typed_section(NotifyConfig, "notify", section)


@dataclass(frozen=True)
class PipelineConfig:
    """One run of the SFT pipeline, section by section (see the module docstring)."""

    name: str
    """Names the run in MLflow and in Kubeflow; lower-case letters, digits and '-'."""
    data: dict[str, Any]
    """`path`: the raw chat/instruction data file; the rest are `megasft prepare` settings."""
    model: dict[str, Any]
    """`path`: the Hugging Face base model directory; `tokenizer`: another tokenizer dir."""
    train: dict[str, Any] = field(default_factory=dict)
    """`megasft train` settings; `recipe` names a recipe YAML whose values come first."""
    launcher: Launcher = field(default_factory=lambda: launcher_from_settings({}))
    """Where training runs: `kind: local` (torchrun in the step), `trainjob` or `pytorchjob`, and
    that launcher's settings; given as a mapping (the saved form), kept as the launcher."""
    evaluate: dict[str, Any] = field(default_factory=dict)
    """`data`: held-out prompts with references; the rest are `megasft evaluate` settings."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow: `uri` (none: no tracking), `experiment`, `registered_model`, `alias`. A mapping
    of these settings (the YAML form) is accepted and typed on construction."""
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    """`webhook`: a URL that receives the run's final status as JSON. A mapping is accepted."""
    description: str = ""
    """One line on what this configuration is for."""

    def __post_init__(self) -> None:
        import re

        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?", self.name or ""):
            raise ConfigError(
                f"name {self.name!r}: use 1 to 40 lower-case letters, digits and '-' "
                "(it names Kubernetes objects and MLflow runs)"
            )
        object.__setattr__(self, "launcher", launcher_from_settings(self.launcher))
        for section in ("data", "model", "train", "evaluate"):
            if not isinstance(getattr(self, section), dict):
                raise ConfigError(f"{section}: expected a mapping of settings")
        # Frozen: the typed sections replace the mappings they were given as.
        object.__setattr__(self, "tracking", tracking_config(self.tracking))
        object.__setattr__(self, "notify", notify_config(self.notify))
        if not self.data.get("path"):
            raise ConfigError("data.path: give the raw data file to fine-tune on")
        if not self.model.get("path"):
            raise ConfigError("model.path: give the Hugging Face base model directory")
        check_keys("model", self.model, _MODEL_KEYS)
        # Each stage's own config class names the keys its section may hold. A training recipe
        # file is read later (it may live where the steps run, not here).
        self.prepare_settings()
        self.train_settings(read_recipe=False)
        self.evaluate_settings()

    # -- the stage settings, ready for each stage's config class ------------------------------

    def prepare_settings(self) -> dict[str, Any]:
        """The `data` section as PrepareConfig keyword arguments (see `prepare_settings`)."""
        return prepare_settings(self.data)

    def train_settings(self, read_recipe: bool = True) -> dict[str, Any]:
        """The `train` section as TrainConfig keyword arguments (see `train_settings`).

        Args:
            read_recipe: read the recipe file the section names (False where it may live
                elsewhere, as when checking the shape on load).

        Returns:
            The settings.

        Raises:
            ConfigError: an unknown key, or a recipe that cannot be read.
        """
        return train_settings(self.train, read_recipe=read_recipe)

    def evaluate_settings(self) -> dict[str, Any]:
        """The `evaluate` section as EvaluateConfig keyword arguments (see `evaluate_settings`)."""
        return evaluate_settings(self.evaluate)

    @property
    def tokenizer_path(self) -> str:
        """The tokenizer's directory: `model.tokenizer`, else the model's own."""
        return str(self.model.get("tokenizer") or self.model["path"])

    # -- saved forms --------------------------------------------------------------------------

    def arguments(self) -> dict[str, Any]:
        """The pipeline's parameters for this configuration (`sft_pipeline(**arguments)`)."""
        return {
            "config_name": self.name,
            "data": dict(self.data),
            "model": dict(self.model),
            "train": dict(self.train),
            "launcher": launcher_section(self.launcher),
            "evaluate": dict(self.evaluate),
            "tracking": _section_values(self.tracking),
            "notify": _section_values(self.notify),
        }

    @classmethod
    def from_arguments(cls, config_name: str, **sections: Any) -> PipelineConfig:
        """The inverse of `arguments()`: what each pipeline step rebuilds from its parameters.

        Args:
            config_name: the configuration's name.
            **sections: the sections, one dict each.

        Returns:
            The configuration.

        Raises:
            ConfigError: a section's shape is wrong (unknown keys, bad values).
        """
        return cls(name=config_name, **sections)

    def with_paths_resolved(self, base: Path) -> PipelineConfig:
        """Relative local paths made absolute against `base` (the steps run elsewhere).

        Args:
            base: the directory relative paths are relative to.

        Returns:
            A copy with the data, model, recipe, prompts and sqlite tracking paths absolute.
        """

        def resolve(value: Any) -> Any:
            if isinstance(value, str) and value and "://" not in value:
                path = Path(value).expanduser()
                return str(path if path.is_absolute() else (base / path).resolve())
            return value

        data = {**self.data, "path": resolve(self.data["path"])}
        model = {key: resolve(value) for key, value in self.model.items()}
        train = dict(self.train)
        if train.get("recipe"):
            train["recipe"] = resolve(train["recipe"])
        evaluate = dict(self.evaluate)
        if evaluate.get("data"):
            evaluate["data"] = resolve(evaluate["data"])
        tracking = self.tracking
        uri = tracking.uri
        if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = "sqlite:///" + resolve(uri.removeprefix("sqlite:///"))
            tracking = dataclasses.replace(tracking, uri=uri)
        return dataclasses.replace(
            self, data=data, model=model, train=train, evaluate=evaluate, tracking=tracking
        )

    def with_overrides(self, assignments: list[str]) -> PipelineConfig:
        """`section.key=value` assignments (values parsed as YAML), as `--set` gives them.

        Args:
            assignments: the assignments, in order.

        Returns:
            A copy with the settings replaced.

        Raises:
            ConfigError: an assignment not of the form SECTION.KEY=VALUE, an unknown section, or
                a result the sections' checks refuse.
        """
        sections = self.arguments()
        name = sections.pop("config_name")
        for assignment in assignments:
            key, equals, text = assignment.partition("=")
            section, dot, setting = key.partition(".")
            if not equals or not dot or not setting:
                raise ConfigError(
                    f"--set {assignment!r}: write SECTION.KEY=VALUE, e.g. train.lr=1e-5"
                )
            if section not in sections:
                raise ConfigError(
                    f"--set {assignment!r}: unknown section {section!r}; "
                    f"known: {', '.join(sections)}"
                )
            sections[section][setting] = _parse_value(text)
        return PipelineConfig(name=name, description=self.description, **sections)


def config_directory() -> Path:
    """pipelines/configs, where the named configurations live (installed with the package)."""
    from megasft.pipeline.sources import configs_directory

    return configs_directory()


def load_pipeline_config(name_or_path: str | Path) -> PipelineConfig:
    """A configuration by name (pipelines/configs/NAME.yaml) or by path to a YAML file.

    Args:
        name_or_path: a shipped configuration's name, or a path.

    Returns:
        The configuration, its shape checked.

    Raises:
        InputError: no such configuration.
        ConfigError: not YAML, not a mapping, an unknown or missing section, or a section the
            checks refuse (the message names the file).
    """
    directory = config_directory()
    path = Path(name_or_path)
    if not path.exists() and (directory / f"{name_or_path}.yaml").is_file():
        path = directory / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in directory.glob("*.yaml"))
        raise InputError(
            f"pipeline config {name_or_path}: no such file; give a path or one of: "
            f"{', '.join(known)}"
        )
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{path}: unknown section(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    try:
        return PipelineConfig(**values)
    except TypeError as error:  # a required section missing
        raise ConfigError(f"{path}: {error}") from error
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


def check_inputs(config: PipelineConfig) -> dict[str, Any]:
    """What needs the files, before any heavy work.

    Args:
        config: the configuration.

    Returns:
        The base model's HF config.

    Raises:
        InputError: a missing data file, model, tokenizer or prompts file.
        ConfigError: a model family megasft does not convert, a gate that does not parse, GPUs
            (per node x nodes) that are not the world size the parallel settings need (naming
            the settings), a training layout that does not fit the model, or a run that does
            not fit in the memory of the GPU the train section names (`memory_plan`).
    """
    from megasft.launch.registry import check_layout
    from megasft.megatron.architecture import architecture_from_hf_config, read_hf_config
    from megasft.train.config import TrainConfig, check_against_experts, check_against_model

    data = Path(config.data["path"])
    if not data.is_file():
        raise InputError(f"data.path {data}: no such file")
    model = Path(config.model["path"])
    if not (model / "config.json").is_file():
        raise InputError(f"model.path {model}: not a Hugging Face model directory (no config.json)")
    tokenizer = Path(config.tokenizer_path)
    if not (tokenizer / "tokenizer.json").is_file():
        raise InputError(f"model.tokenizer {tokenizer}: no tokenizer.json there")
    hf_config = read_hf_config(model)
    try:
        architecture = architecture_from_hf_config(hf_config)
    except ConfigError as error:
        raise ConfigError(f"model.path {model}: {error}") from error
    if config.evaluate.get("data") and not Path(config.evaluate["data"]).is_file():
        raise InputError(f"evaluate.data {config.evaluate['data']}: no such file")
    if config.evaluate.get("gate"):
        from megasft.evaluate.metrics import parse_gate

        try:
            parse_gate(config.evaluate["gate"])
        except ConfigError as error:
            raise ConfigError(f"evaluate.gate: {error}") from error
    seq_length = _seq_length(config)
    placeholders = {name: "." for name in TRAIN_WIRED}  # the artifacts the pipeline wires in
    # The processes as the launcher runs them: train.nproc and train.nodes say it only locally.
    settings = check_layout(config.launcher, config.train_settings())
    try:
        train = TrainConfig(**settings, **placeholders)
        check_against_model(train, hf_config, seq_length)
        check_against_experts(train, architecture)
    except TypeError as error:  # a wrong type, say a list for an int
        raise ConfigError(f"train: {error}") from error
    except ConfigError as error:
        raise ConfigError(f"train: {error}") from error
    plan = memory_plan(config, hf_config)
    if plan is not None and not plan.fits:
        from megasft.plan.report import report

        raise ConfigError(
            f"train: the run does not fit in the memory of its GPUs (megasft plan):\n{report(plan)}"
        )
    return hf_config


def memory_plan(config: PipelineConfig, hf_config: dict[str, Any]):
    """`megasft plan`'s memory plan of the training step, when the train section names its
    GPU (`device`, or `device_memory` in GiB).

    Args:
        config: the run configuration.
        hf_config: the base model's config.json.

    Returns:
        The MemoryPlan (megasft.plan.memory), or None when the section names no GPU.

    Raises:
        ConfigError: an unknown device, or a layout the model cannot take.
    """
    from megasft.launch.registry import check_layout
    from megasft.megatron.architecture import architecture_from_hf_config
    from megasft.plan.cli import plan_run
    from megasft.train.config import TrainConfig

    device, memory = config.train.get("device"), config.train.get("device_memory")
    if device is None and memory is None:
        return None
    placeholders = {name: "." for name in TRAIN_WIRED}
    # The processes as the launcher runs them (as check_inputs takes them).
    settings = check_layout(config.launcher, config.train_settings())
    try:
        return plan_run(
            TrainConfig(**settings, **placeholders),
            architecture_from_hf_config(hf_config),
            _seq_length(config),
            device=device,
            device_memory_gib=memory,
        )
    except ConfigError as error:
        raise ConfigError(f"train: {error}") from error


def _seq_length(config: PipelineConfig) -> int:
    """The rows' length the data section prepares (PrepareConfig's default if not given)."""
    from megasft.data.config import PrepareConfig

    default = next(f.default for f in dataclasses.fields(PrepareConfig) if f.name == "seq_length")
    return config.prepare_settings().get("seq_length", default)


def _parse_value(text: str) -> Any:
    """A `--set` value as YAML reads it, except that 1e-4 is a number (YAML 1.1 wants 1.0e-4)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _typed_section(config_class: type, section: str, values: Any) -> Any:
    if isinstance(values, config_class):
        return values
    if not isinstance(values, Mapping):
        raise ConfigError(f"{section}: expected a mapping of settings")
    check_keys(section, dict(values), field_names(config_class))
    return config_class(**values)


def _section_values(config: Any) -> dict[str, Any]:
    """A typed section as the pipeline parameter carries it: the settings that are set."""
    return {key: value for key, value in dataclasses.asdict(config).items() if value is not None}
