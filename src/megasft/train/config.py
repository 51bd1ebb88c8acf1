"""The training stage's settings: one frozen dataclass, validated on construction.

A recipe YAML is its saved form (`recipes/*.yaml`); command-line flags override the recipe,
and the recipe overrides the defaults below. Settings that need the model (TP against the
head counts, the sequence length against the model's) are checked by `check_against_model`
before any heavy work starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from megasft.errors import ConfigError
from megasft.megatron.attention import ATTENTION_CHOICES
from megasft.megatron.peft.registry import PeftSettings, method_named, method_names
from megasft.settings import flag_of, raise_problems, setting, setting_problems

if TYPE_CHECKING:
    from megasft.megatron.architecture import ModelArchitecture

PRECISIONS = ("bf16", "fp32")
NAN_POLICIES = ("skip", "stop")
TOKEN_DISPATCHERS = ("alltoall", "allgather")
RECOMPUTE_MODES = ("none", "selective", "full")
FP8_MODES = ("none", "hybrid", "e4m3")


@dataclass(frozen=True)
class TrainConfig:
    data: str = setting(
        help="A `megasft prepare` output directory (train.arrow, val.arrow, manifest.json).",
        metavar="DIR",
    )
    load: str = setting(
        help="A `megasft convert --to megatron` checkpoint: weights only are loaded from it.",
        metavar="DIR",
    )
    save: str = setting(
        help="Output directory: checkpoints, metrics.jsonl, summary.json. A run started on a "
        "directory that already holds a checkpoint resumes from it.",
        metavar="DIR",
    )
    tensor_parallel: int = setting(
        1, "TP: splits each layer's matrices across this many devices.", flag="--tp", at_least=1
    )
    pipeline_parallel: int = setting(
        1, "PP: splits the layers into this many stages.", flag="--pp", at_least=1
    )
    virtual_pipeline_stages: int | None = setting(
        None, "Interleaved pipeline schedule: model chunks per pipeline stage (needs PP > 1)."
    )
    context_parallel: int = setting(
        1, "CP: splits each sequence across this many devices (GPU only).", flag="--cp", at_least=1
    )
    expert_parallel: int = setting(
        1,
        "EP (mixture-of-experts models): splits each MoE layer's experts across this many "
        "devices, taken from the data-parallel (and context-parallel) ones.",
        flag="--ep",
        at_least=1,
    )
    expert_tensor_parallel: int | None = setting(
        None,
        "ETP (mixture-of-experts models): splits each expert's matrices across this many "
        "devices. Default: --tp.",
        flag="--etp",
        at_least=1,
    )
    moe_aux_loss_coeff: float | None = setting(
        None,
        "Weight of the MoE load-balancing loss (megatron-core's, per MoE layer; 0 turns it "
        "off). Default: the model's router_aux_loss_coef.",
        at_least=0,
    )
    moe_token_dispatcher: str = setting(
        "alltoall",
        "How MoE layers send tokens to the ranks that hold their experts: all-to-all, or "
        "all-gather then each rank keeps its own.",
        choices=TOKEN_DISPATCHERS,
    )
    nproc: int = setting(1, "Processes (devices) per node; world size = nproc * nodes.", at_least=1)
    nodes: int = setting(1, "Nodes in the job (set by the PyTorchJob launcher).", at_least=1)
    micro_batch_size: int = setting(
        1, "Rows per forward pass on one data-parallel rank.", at_least=1
    )
    global_batch_size: int = setting(
        8, "Rows per optimizer step over all data-parallel ranks and micro-batches.", at_least=1
    )
    train_iters: int | None = setting(None, "Optimizer steps; exclusive with --epochs.", at_least=1)
    epochs: float | None = setting(
        None,
        "Passes over the train split (converted to steps); exclusive with --train-iters.",
        above=0,
    )
    lr: float = setting(1e-5, "Peak learning rate, reached at the end of warmup.", above=0)
    min_lr: float = setting(0.0, "Learning rate at the end of the cosine decay.", at_least=0)
    warmup_iters: int = setting(0, "Steps of linear warmup from 0 to --lr.", at_least=0)
    weight_decay: float = setting(0.0, "AdamW weight decay; never applied to norms and biases.")
    adam_beta1: float = setting(0.9, "AdamW beta1: decay rate of the gradient's running mean.")
    adam_beta2: float = setting(
        0.95, "AdamW beta2: decay rate of the squared gradient's running mean."
    )
    adam_eps: float = setting(1e-8, "AdamW epsilon, added to the denominator for stability.")
    clip_grad: float = setting(1.0, "Gradient clipping by global norm; 0 turns it off.")
    eval_interval: int = setting(
        0, "Validation loss every this many steps (0: only at the end).", at_least=0
    )
    save_interval: int = setting(
        0, "A checkpoint every this many steps (0: only at the end).", at_least=0
    )
    keep_checkpoints: int = setting(2, "How many of the latest checkpoints to keep.", at_least=1)
    seed: int = setting(
        1234, "Seeds the initialisation of anything not loaded, dropout and data order."
    )
    precision: str = setting(
        "bf16",
        "bf16 (with fp32 main weights in the optimizer) or fp32.",
        choices=PRECISIONS,
    )
    nan_policy: str = setting(
        "skip",
        "What a NaN/Inf loss or gradient does: skip the step (counted) or stop the run.",
        choices=NAN_POLICIES,
    )
    max_bad_steps: int = setting(
        10, "Stop when this many steps in a row were skipped (0: never stop for that).", at_least=0
    )
    spike_factor: float = setting(
        3.0,
        "Log a loss spike when a step's loss exceeds this many times the running mean.",
        above=1,
    )
    log_interval: int = setting(
        1, "Steps between progress-bar and metrics-log updates.", at_least=1
    )
    tracking_uri: str | None = setting(
        None, "MLflow tracking URI; per-step metrics are logged there when set."
    )
    experiment: str = setting("megasft-train", "MLflow experiment name (with --tracking-uri).")
    distributed_optimizer: bool | None = setting(
        None,
        "Shard the fp32 main weights and Adam states across data-parallel ranks (ZeRO-1). "
        "Default: on with an accelerator, off on CPU.",
    )
    eval_batches: int = setting(
        0,
        "Validation micro-batches per data-parallel rank at each evaluation (0: the whole val "
        "split).",
        at_least=0,
    )
    peft: str | None = setting(
        None,
        "Parameter-efficient fine-tuning: train adapters of this method on a frozen base "
        "(checkpoints then hold the adapters only). Default: full fine-tuning.",
        choices=method_names,
    )
    lora_rank: int = setting(16, "LoRA: the adapters' rank r (with --peft lora).", at_least=1)
    lora_alpha: float = setting(
        32.0, "LoRA: the adapters' output is scaled by alpha / rank.", above=0
    )
    lora_dropout: float = setting(
        0.0, "LoRA: dropout on the adapters' input, in [0, 1).", at_least=0
    )
    lora_targets: str = setting(
        "linear_qkv,linear_proj,linear_fc1,linear_fc2",
        "LoRA: the megatron-core linears to adapt, comma-separated (linear_qkv holds q, k "
        "and v; linear_fc1 gate and up; output_layer, HF's lm_head, may be added).",
        metavar="NAMES",
    )
    attention: str = setting(
        "auto",
        "Core attention: te (Transformer Engine, bf16 on GPUs), torch (SDPA, varlen flash or "
        "FlexAttention; any precision and device), or auto (te where it runs, else torch).",
        choices=ATTENTION_CHOICES,
    )
    require_accelerator: bool = setting(
        False,
        "Refuse to start without a CUDA/ROCm device rather than train on the CPU (the cluster "
        "launchers pass it: a job that asked for GPUs must get them).",
    )
    final_checkpoint: bool = setting(
        True,
        "Save a checkpoint when the run ends (--no-final-checkpoint for benchmarks: then only "
        "--save-interval writes one).",
    )
    hidden_dropout: float = setting(
        0.0,
        "Dropout probability on the embedding and on the output of every attention and MLP "
        "block (megatron-core's hidden_dropout; its masks are drawn alike on every "
        "tensor-parallel rank).",
        at_least=0,
    )
    attention_dropout: float = setting(
        0.0,
        "Dropout probability on the attention probabilities (drawn from megatron-core's "
        "tensor-parallel RNG stream: each rank's heads have their own masks).",
        at_least=0,
    )
    recompute: str = setting(
        "none",
        "Activation recomputation in backward: none; selective (the core attention: saves its "
        "s^2 tensors, little where flash attention recomputes anyway); full (whole layers, "
        "keeping only each layer's input: about a third more compute). `megasft plan` shows "
        "what each saves.",
        choices=RECOMPUTE_MODES,
    )
    recompute_layers: int | None = setting(
        None,
        "With --recompute full: recompute only the first this many layers of each pipeline "
        "stage (of each model chunk with virtual stages); default all.",
        at_least=1,
    )
    fp8: str = setting(
        "none",
        "FP8 matrix multiplies in Transformer Engine's layers: none; hybrid (e4m3 forward, "
        "e5m2 gradients); e4m3 (both). Needs GPUs with Transformer Engine and --precision bf16.",
        choices=FP8_MODES,
    )

    def __post_init__(self) -> None:
        problems = setting_problems(self)
        if (self.train_iters is None) == (self.epochs is None):
            problems.append("give exactly one of --train-iters and --epochs")
        if self.virtual_pipeline_stages is not None and (
            self.virtual_pipeline_stages < 1 or self.pipeline_parallel == 1
        ):
            problems.append("--virtual-pipeline-stages needs --pp > 1 and a value of at least 1")
        for name in ("hidden_dropout", "attention_dropout"):
            if getattr(self, name) >= 1:
                problems.append(f"{flag_of(self, name)} must be below 1, got {getattr(self, name)}")
        if self.recompute_layers is not None and self.recompute != "full":
            problems.append("--recompute-layers needs --recompute full")
        if self.fp8 != "none" and self.precision != "bf16":
            problems.append(f"--fp8 {self.fp8} needs --precision bf16 (the weights FP8 casts from)")
        # The checks below combine settings, and need each of them valid on its own.
        raise_problems(problems)
        if self.peft is not None:
            problems.extend(method_named(self.peft).problems(self.peft_settings))
        if self.train_iters is not None and self.warmup_iters >= self.train_iters:
            problems.append(
                f"--warmup-iters {self.warmup_iters} must be below --train-iters {self.train_iters}"
            )
        if self.min_lr > self.lr:
            problems.append(f"need 0 <= --min-lr <= --lr, got min-lr {self.min_lr}, lr {self.lr}")
        model_parallel = self.tensor_parallel * self.pipeline_parallel * self.context_parallel
        if self.world_size % model_parallel:
            problems.append(
                f"world size {self.world_size} (--nproc {self.nproc} x {self.nodes} nodes) is not "
                f"divisible by TP x PP x CP = {model_parallel}"
            )
            raise_problems(problems)  # the data-parallel size below needs a whole number
        # MoE layers regroup each pipeline stage's ranks into ETP x EP (x expert-DP) groups.
        expert_grid = self.expert_parallel * self.expert_tensor_size * self.pipeline_parallel
        if self.world_size % expert_grid:
            problems.append(
                f"world size {self.world_size} (--nproc {self.nproc} x {self.nodes} nodes) is not "
                f"divisible by EP x ETP x PP = {self.expert_parallel} x "
                f"{self.expert_tensor_size} x {self.pipeline_parallel} = {expert_grid} "
                "(--ep, --etp, --pp): the MoE layers split each pipeline stage's ranks into "
                "groups of EP x ETP"
            )
        step_rows = self.micro_batch_size * self.data_parallel
        if self.global_batch_size % step_rows:
            problems.append(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size {self.micro_batch_size} x data-parallel size "
                f"{self.data_parallel} = {step_rows}"
            )
        elif self.virtual_pipeline_stages and self.micro_batches % self.pipeline_parallel:
            problems.append(
                f"the interleaved schedule (--virtual-pipeline-stages) needs the micro-batches "
                f"per step ({self.micro_batches}) to be a multiple of --pp "
                f"{self.pipeline_parallel}; raise --global-batch-size"
            )
        raise_problems(problems)

    @property
    def peft_settings(self) -> PeftSettings | None:
        """What --peft and the --lora-* settings ask for (None: full fine-tuning)."""
        if self.peft is None:
            return None
        return PeftSettings(
            method=self.peft,
            rank=self.lora_rank,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            targets=tuple(name.strip() for name in self.lora_targets.split(",") if name.strip()),
        )

    @property
    def world_size(self) -> int:
        return self.nproc * self.nodes

    @property
    def expert_tensor_size(self) -> int:
        """ETP: `expert_tensor_parallel`, or TP when that is not given."""
        return self.expert_tensor_parallel or self.tensor_parallel

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


def check_against_experts(config: TrainConfig, architecture: ModelArchitecture) -> None:
    """The expert-parallel and PEFT settings against the model: its experts (or their absence),
    and for PEFT, what the method needs of it.

    Args:
        config: the settings.
        architecture: the model's architecture.

    Raises:
        ConfigError: every problem found, naming the settings: EP or ETP for a dense model,
            an EP that does not divide the experts, an ETP that does not divide their width,
            and for an MoE model, PEFT adapters on MLP linears (LoRA covers its attention
            projections) or on a model that mixes dense and MoE layers; and whatever the PEFT
            method finds wrong with the model (LoRA: an output layer tied to the embedding).
    """
    problems = []
    moe = architecture.moe
    if moe is None:
        if config.expert_parallel > 1 or config.expert_tensor_size != config.tensor_parallel:
            problems.append(
                f"--ep {config.expert_parallel} / --etp {config.expert_tensor_size}: the model "
                f"({architecture.family}) has no experts; use --ep 1 and leave --etp unset"
            )
    else:
        if moe.num_experts % config.expert_parallel:
            problems.append(
                f"--ep {config.expert_parallel} does not divide the model's {moe.num_experts} "
                "experts per MoE layer"
            )
        if moe.expert_ffn_hidden_size % config.expert_tensor_size:
            problems.append(
                f"--etp {config.expert_tensor_size} does not divide the experts' intermediate "
                f"size ({moe.expert_ffn_hidden_size})"
            )
        peft = config.peft_settings
        if peft is not None:
            mlp_targets = [target for target in peft.targets if target in MLP_LINEARS]
            if mlp_targets:
                problems.append(
                    f"--lora-targets {','.join(mlp_targets)}: an MoE model has adapters on its "
                    "attention projections only (its experts and routers stay frozen); use "
                    "--lora-targets linear_qkv,linear_proj"
                )
            if not architecture.stacked_layers:
                problems.append(
                    f"--peft {peft.method}: the model mixes dense and MoE layers, which PEFT "
                    "does not support yet; train it fully (no --peft)"
                )
    if config.peft is not None:  # what the method itself says of the model
        problems.extend(
            method_named(config.peft).model_problems(config.peft_settings, architecture)
        )
    raise_problems(problems)


MLP_LINEARS = ("linear_fc1", "linear_fc2")
"""The PEFT targets in a layer's MLP: an MoE layer has experts there instead."""


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
