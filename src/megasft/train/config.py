"""The training stage's settings: one frozen dataclass, validated on construction.

A recipe YAML is its saved form (`recipes/*.yaml`); command-line flags override the recipe,
and the recipe overrides the defaults below. Settings that need the model (TP against the
head counts, the sequence length against the model's) are checked by `check_against_model`
before any heavy work starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from megasft.errors import ConfigError

PRECISIONS = ("bf16", "fp32")
NAN_POLICIES = ("skip", "stop")


@dataclass(frozen=True)
class TrainConfig:
    data: str
    """A `megasft prepare` output directory (train.arrow, val.arrow, manifest.json)."""
    load: str
    """A `megasft convert --to megatron` checkpoint: weights only are loaded from it."""
    save: str
    """Output directory: checkpoints, metrics.jsonl, summary.json. A run started on a
    directory that already holds a checkpoint resumes from it."""
    tensor_parallel: int = 1
    """TP: splits each layer's matrices across this many devices."""
    pipeline_parallel: int = 1
    """PP: splits the layers into this many stages."""
    virtual_pipeline_stages: int | None = None
    """Interleaved pipeline schedule: model chunks per pipeline stage (needs PP > 1)."""
    context_parallel: int = 1
    """CP: splits each sequence across this many devices (GPU only)."""
    nproc: int = 1
    """Processes (devices) per node; world size = nproc * nodes."""
    nodes: int = 1
    """Nodes in the job (set by the PyTorchJob launcher)."""
    micro_batch_size: int = 1
    """Rows per forward pass on one data-parallel rank."""
    global_batch_size: int = 8
    """Rows per optimizer step over all data-parallel ranks and micro-batches."""
    train_iters: int | None = None
    """Optimizer steps; exclusive with `epochs`."""
    epochs: float | None = None
    """Passes over the train split (converted to steps); exclusive with `train_iters`."""
    lr: float = 1e-5
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    warmup_iters: int = 0
    """Steps of linear warmup from 0 to `lr`."""
    weight_decay: float = 0.0
    """AdamW weight decay; never applied to norms and biases."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Gradient clipping by global norm; 0 turns it off."""
    eval_interval: int = 0
    """Validation loss every this many steps (0: only at the end)."""
    save_interval: int = 0
    """A checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many of the latest checkpoints to keep."""
    seed: int = 1234
    """Seeds the initialisation of anything not loaded, dropout and data order."""
    precision: str = "bf16"
    """bf16 (with fp32 main weights in the optimizer) or fp32."""
    nan_policy: str = "skip"
    """What a NaN/Inf loss or gradient does: skip the step (counted) or stop the run."""
    max_bad_steps: int = 10
    """Stop when this many steps in a row were skipped (0: never stop for that)."""
    spike_factor: float = 3.0
    """Log a loss spike when a step's loss exceeds this many times the running mean."""
    log_interval: int = 1
    """Steps between progress-bar and metrics-log updates."""
    tracking_uri: str | None = None
    """MLflow tracking URI; per-step metrics are logged there when set."""
    experiment: str = "megasft-train"
    """MLflow experiment name (with `tracking_uri`)."""
    distributed_optimizer: bool | None = None
    """Shard the fp32 main weights and Adam states across data-parallel ranks (ZeRO-1).
    Default: on with an accelerator, off on CPU."""
    eval_batches: int = 0
    """Validation micro-batches per data-parallel rank at each evaluation (0: the whole val
    split)."""

    def __post_init__(self) -> None:
        for name in (
            "tensor_parallel",
            "pipeline_parallel",
            "context_parallel",
            "nproc",
            "nodes",
            "micro_batch_size",
            "global_batch_size",
            "keep_checkpoints",
            "log_interval",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in (
            "warmup_iters",
            "eval_interval",
            "save_interval",
            "max_bad_steps",
            "eval_batches",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_flag(name)} must not be negative, got {getattr(self, name)}")
        if (self.train_iters is None) == (self.epochs is None):
            raise ConfigError("give exactly one of --train-iters and --epochs")
        if self.train_iters is not None and self.train_iters < 1:
            raise ConfigError(f"--train-iters must be at least 1, got {self.train_iters}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"--epochs must be positive, got {self.epochs}")
        if self.train_iters is not None and self.warmup_iters >= self.train_iters:
            raise ConfigError(
                f"--warmup-iters {self.warmup_iters} must be below --train-iters {self.train_iters}"
            )
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.spike_factor <= 1:
            raise ConfigError(f"--spike-factor must be above 1, got {self.spike_factor}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"need 0 <= --min-lr <= --lr, got min-lr {self.min_lr}, lr {self.lr}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.nan_policy not in NAN_POLICIES:
            raise ConfigError(f"--nan-policy must be one of {', '.join(NAN_POLICIES)}")
        if self.virtual_pipeline_stages is not None and (
            self.virtual_pipeline_stages < 1 or self.pipeline_parallel == 1
        ):
            raise ConfigError("--virtual-pipeline-stages needs --pp > 1 and a value of at least 1")
        model_parallel = self.tensor_parallel * self.pipeline_parallel * self.context_parallel
        if self.world_size % model_parallel:
            raise ConfigError(
                f"world size {self.world_size} (--nproc {self.nproc} x {self.nodes} nodes) is not "
                f"divisible by TP x PP x CP = {model_parallel}"
            )
        step_rows = self.micro_batch_size * self.data_parallel
        if self.global_batch_size % step_rows:
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size {self.micro_batch_size} x data-parallel size "
                f"{self.data_parallel} = {step_rows}"
            )
        if self.virtual_pipeline_stages and self.micro_batches % self.pipeline_parallel:
            raise ConfigError(
                f"the interleaved schedule (--virtual-pipeline-stages) needs the micro-batches "
                f"per step ({self.micro_batches}) to be a multiple of --pp "
                f"{self.pipeline_parallel}; raise --global-batch-size"
            )

    @property
    def world_size(self) -> int:
        return self.nproc * self.nodes

    @property
    def data_parallel(self) -> int:
        return self.world_size // (
            self.tensor_parallel * self.pipeline_parallel * self.context_parallel
        )

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank (gradient accumulation)."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel)

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)


def _flag(name: str) -> str:
    aliases = {"tensor_parallel": "tp", "pipeline_parallel": "pp", "context_parallel": "cp"}
    return "--" + aliases.get(name, name).replace("_", "-")


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Reads a recipe YAML into TrainConfig field values, rejecting unknown keys by name."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read recipe {path}: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(
            f"recipe {path} must be a mapping of settings, not {type(values).__name__}"
        )
    known = {field.name for field in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"recipe {path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return values


def build_config(recipe: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the recipe, then explicit overrides (None means "not given")."""
    values = load_recipe(recipe) if recipe else {}
    given = {key: value for key, value in overrides.items() if value is not None}
    # --train-iters on the command line replaces a recipe's epochs, and the other way round.
    for flag, other in (("train_iters", "epochs"), ("epochs", "train_iters")):
        if flag in given and other not in given:
            values.pop(other, None)
    values.update(given)
    missing = [name for name in ("data", "load", "save") if name not in values]
    if missing:
        raise ConfigError(f"missing required setting(s): {', '.join('--' + m for m in missing)}")
    try:
        return TrainConfig(**values)
    except TypeError as error:  # a wrong type in the YAML, say a list for an int
        raise ConfigError(f"invalid training settings: {error}") from error


def check_against_model(config: TrainConfig, hf_config: dict, seq_length: int) -> None:
    """Settings that depend on the model, checked before the model is built.

    `hf_config` is the model's Hugging Face config (its heads, query groups and context).
    """
    heads = hf_config.get("num_attention_heads")
    groups = hf_config.get("num_key_value_heads") or heads
    tp = config.tensor_parallel
    if heads and heads % tp:
        raise ConfigError(f"--tp {tp} does not divide the model's {heads} attention heads")
    if groups and groups % tp:
        raise ConfigError(
            f"--tp {tp} does not divide the model's {groups} query groups (num_key_value_heads)"
        )
    layers = hf_config.get("num_hidden_layers")
    stages = config.pipeline_parallel * (config.virtual_pipeline_stages or 1)
    if layers and layers % stages:
        raise ConfigError(
            f"the model's {layers} layers cannot be split into {stages} pipeline stages "
            "(--pp x --virtual-pipeline-stages)"
        )
    context = hf_config.get("max_position_embeddings")
    if context and seq_length > context:
        raise ConfigError(
            f"the dataset's sequence length {seq_length} is above the model's "
            f"max_position_embeddings {context}; prepare the data with a smaller --seq-length"
        )


def field_docs() -> dict[str, str]:
    """Each TrainConfig field's docstring (the string under it in the source), for --help."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(TrainConfig)))
    except (OSError, TypeError):  # no source (a frozen build): help without descriptions
        return {}
    docs = {}
    body = tree.body[0].body
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def flag_name(name: str) -> str:
    """The command-line flag of a TrainConfig field: --tp for tensor_parallel, else dashes."""
    return _flag(name)
