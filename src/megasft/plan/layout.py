"""The settings of a run that decide its memory, as the plan reads them (`Layout`).

`layout_from_config` takes a `TrainConfig` and the sequence length. What the trainer decides
by itself follows from `accelerator` as it does in megasft.train.build: Transformer Engine
layers, sequence parallelism with TP > 1 (`sequence_parallel`: on CPU too for MoE models), the
distributed optimizer by default, gradients reduced in buckets during backward, and a
pipeline stage's output freed once sent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megasft.errors import ConfigError
from megasft.megatron.architecture import ModelArchitecture
from megasft.megatron.peft import PeftSettings, method_named
from megasft.train.config import MLP_LINEARS, RECOMPUTE_MODES, TrainConfig


@dataclass(frozen=True)
class Layout:
    """The parallel layout, batch and numerics of one run."""

    seq_length: int
    """Tokens per row of a micro-batch."""
    world_size: int = 1
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_stages: int = 1
    """Model chunks per pipeline stage (1: the plain 1F1B schedule)."""
    context_parallel: int = 1
    expert_parallel: int = 1
    """EP: each MoE layer's experts split over this many ranks."""
    expert_tensor_parallel: int | None = None
    """ETP: each expert's matrices split over this many ranks (None: TP)."""
    micro_batch_size: int = 1
    global_batch_size: int = 1
    precision: str = "bf16"
    distributed_optimizer: bool = True
    accelerator: bool = True
    """GPUs: Transformer Engine layers (fused norms, flash attention), sequence parallelism
    with TP > 1, gradient buckets, pipeline outputs freed once sent. False: the CPU path."""
    recompute: str = "none"
    recompute_layers: int | None = None
    """With full recompute: the first this many layers of each model chunk (None: all)."""
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    fp8: str = "none"
    """FP8 through Transformer Engine: its FP8 weight copies are counted; activations are
    counted at 16 bits (an upper bound)."""
    peft: PeftSettings | None = None
    """A PEFT method's settings (--peft): the base is frozen, its adapters trained."""

    def __post_init__(self) -> None:
        if self.recompute not in RECOMPUTE_MODES:
            raise ConfigError(f"--recompute must be one of {', '.join(RECOMPUTE_MODES)}")
        model_parallel = self.tensor_parallel * self.pipeline_parallel * self.context_parallel
        if self.world_size % model_parallel:
            raise ConfigError(
                f"world size {self.world_size} is not divisible by TP x PP x CP = {model_parallel}"
            )
        expert_grid = self.expert_parallel * self.expert_tensor_size * self.pipeline_parallel
        if self.world_size % expert_grid:
            raise ConfigError(
                f"world size {self.world_size} is not divisible by EP x ETP x PP = {expert_grid}"
            )
        if self.global_batch_size % (self.micro_batch_size * self.data_parallel):
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size {self.micro_batch_size} x data-parallel size "
                f"{self.data_parallel}"
            )
        if self.seq_length % self.context_parallel:
            raise ConfigError(
                f"--seq-length {self.seq_length} is not divisible by --cp {self.context_parallel}"
            )

    @property
    def data_parallel(self) -> int:
        return self.world_size // (
            self.tensor_parallel * self.pipeline_parallel * self.context_parallel
        )

    @property
    def expert_tensor_size(self) -> int:
        """ETP: `expert_tensor_parallel`, or TP when that is not given."""
        return self.expert_tensor_parallel or self.tensor_parallel

    @property
    def expert_data_parallel(self) -> int:
        """The ranks an expert's weights are replicated over, which the distributed optimizer
        shards their buffer over (megatron-core folds CP into them)."""
        return self.world_size // (
            self.expert_parallel * self.expert_tensor_size * self.pipeline_parallel
        )

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel)

    @property
    def gradient_shards(self) -> int:
        """Ranks the distributed optimizer shards over: data x context parallel."""
        return self.data_parallel * self.context_parallel

    @property
    def element_bytes(self) -> int:
        """Bytes of one weight or activation element: 2 for bf16, 4 for fp32."""
        return 2 if self.precision == "bf16" else 4

    @property
    def transformer_engine(self) -> bool:
        return self.accelerator

    @property
    def overlap_grad_reduce(self) -> bool:
        return self.accelerator

    @property
    def deallocate_pipeline_outputs(self) -> bool:
        return self.accelerator

    def replace(self, **changes) -> Layout:
        return dataclasses.replace(self, **changes)


def layout_from_config(config: TrainConfig, seq_length: int, *, accelerator: bool = True) -> Layout:
    """The layout of a run of `config` on rows of `seq_length` tokens.

    Args:
        config: the training settings (a recipe and flags).
        seq_length: tokens per row (the prepared dataset's, or `--seq-length`).
        accelerator: plan for GPUs (the trainer's accelerator choices) or for the CPU.

    Returns:
        The layout.
    """
    distributed_optimizer = config.distributed_optimizer
    if distributed_optimizer is None:
        distributed_optimizer = accelerator
    return Layout(
        seq_length=seq_length,
        world_size=config.world_size,
        tensor_parallel=config.tensor_parallel,
        pipeline_parallel=config.pipeline_parallel,
        virtual_pipeline_stages=config.virtual_pipeline_stages or 1,
        context_parallel=config.context_parallel,
        expert_parallel=config.expert_parallel,
        expert_tensor_parallel=config.expert_tensor_parallel,
        micro_batch_size=config.micro_batch_size,
        global_batch_size=config.global_batch_size,
        precision=config.precision,
        distributed_optimizer=distributed_optimizer,
        accelerator=accelerator,
        recompute=config.recompute,
        recompute_layers=config.recompute_layers,
        hidden_dropout=config.hidden_dropout,
        attention_dropout=config.attention_dropout,
        fp8=config.fp8,
        peft=config.peft_settings,
    )


def sequence_parallel(architecture: ModelArchitecture, layout: Layout) -> bool:
    """Sequence parallelism, as the trainer decides it (megasft.train.build's
    `uses_sequence_parallel`): with TP > 1 on GPUs, and on CPU too for a model with MoE
    layers (megatron-core's MoE layer trains with TP only under it)."""
    return layout.tensor_parallel > 1 and (layout.accelerator or architecture.moe is not None)


def check_layout(architecture: ModelArchitecture, layout: Layout) -> None:
    """Refuse a layout megatron-core cannot build for this model.

    Args:
        architecture: the model.
        layout: the layout.

    Raises:
        ConfigError: naming the setting and the model's size it does not divide.
    """
    a, tp = architecture, layout.tensor_parallel
    for name, value in (
        ("attention heads", a.num_attention_heads),
        ("query groups (num_key_value_heads)", a.num_query_groups),
        ("intermediate_size", a.ffn_hidden_size),
        ("padded vocabulary", a.padded_vocab_size),
    ):
        if value % tp:
            raise ConfigError(f"--tp {tp} does not divide the model's {name} ({value})")
    moe = a.moe
    if moe is None and (layout.expert_parallel > 1 or layout.expert_tensor_size != tp):
        raise ConfigError(
            f"--ep {layout.expert_parallel} / --etp {layout.expert_tensor_size}: the model "
            f"({a.family}) has no experts"
        )
    if moe is not None and moe.num_experts % layout.expert_parallel:
        raise ConfigError(
            f"--ep {layout.expert_parallel} does not divide the model's {moe.num_experts} experts"
        )
    if moe is not None and moe.expert_ffn_hidden_size % layout.expert_tensor_size:
        raise ConfigError(
            f"--etp {layout.expert_tensor_size} does not divide the experts' intermediate size "
            f"({moe.expert_ffn_hidden_size})"
        )
    peft = layout.peft
    # as the trainer refuses them (megasft.train.config.check_against_experts)
    if (
        moe is not None
        and peft is not None
        and (set(peft.targets) & set(MLP_LINEARS) or not a.stacked_layers)
    ):
        raise ConfigError(
            f"--peft {peft.method} on an MoE model adapts the attention projections only "
            "(--lora-targets linear_qkv,linear_proj), of a model without dense layers"
        )
    if peft is not None:  # what the method refuses of the model (a tied output layer)
        refused = method_named(peft.method).model_problems(peft, a)
        if refused:
            raise ConfigError("; ".join(refused))
    stages = layout.pipeline_parallel * layout.virtual_pipeline_stages
    if a.num_layers % stages:
        raise ConfigError(
            f"the model's {a.num_layers} layers cannot be split into {stages} pipeline stages "
            "(--pp x --virtual-pipeline-stages)"
        )
    layers = a.num_layers // stages
    if layout.recompute_layers is not None and layout.recompute_layers > layers:
        raise ConfigError(
            f"--recompute-layers {layout.recompute_layers} is more than the {layers} layers of "
            "each pipeline stage (model chunk)"
        )
    if layout.seq_length > a.max_position_embeddings:
        raise ConfigError(
            f"--seq-length {layout.seq_length} is above the model's max_position_embeddings "
            f"{a.max_position_embeddings}"
        )
