"""The two objects of a training run: `Parts`, what `setup` builds and the loop only uses, and
`LoopState`, what the loop changes (what a checkpoint saves, and `restore` reads back).

The recipe (megasft.train.recipe) builds one of each and passes them to every phase. See
docs/train.md for what a checkpoint holds and when a run may resume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from megasft.megatron.architecture import ModelArchitecture
from megasft.train.checks import RunPlan
from megasft.train.config import TrainConfig
from megasft.train.distributed import Parallel
from megasft.train.feed import RunData
from megasft.train.metrics import StabilityMonitor
from megasft.train.moe import RoutingMetrics
from megasft.train.reporting import Reporting


@dataclass(frozen=True)
class Parts:
    """What `setup` builds: the same objects from the first step to the last."""

    plan: RunPlan
    parallel: Parallel
    model: list[torch.nn.Module]
    """Model chunks of this pipeline stage (one, or one per virtual stage), DDP-wrapped."""
    optimizer: Any
    """megatron-core's optimizer (mixed precision, optionally distributed) over `model`."""
    scheduler: Any
    """megatron-core's OptimizerParamScheduler: the learning rate of each step."""
    data: RunData
    reporting: Reporting
    nan_steps: frozenset[int] = frozenset()
    """Steps (1-based) whose loss is made NaN: fault injection for tests."""
    routing: RoutingMetrics | None = None
    """An MoE model's per-step routing metrics (megasft.train.moe); None for a dense one."""

    @property
    def config(self) -> TrainConfig:
        return self.plan.config

    @property
    def architecture(self) -> ModelArchitecture:
        return self.plan.architecture


@dataclass
class LoopState:
    """What the loop changes; a checkpoint saves it and `restore` reads it back."""

    monitor: StabilityMonitor
    step: int = 0
    """Optimizer steps completed."""
    updates: int = 0
    """Steps whose update was applied (not skipped): where the learning-rate schedule is."""
    totals: dict[str, float] = field(
        default_factory=lambda: {
            "tokens": 0,
            "target_tokens": 0,
            "flops": 0.0,
            "seconds": 0.0,
            "steps": 0,
        }
    )
    """Sums over the steps of this run and the runs it resumes, for summary.json."""
    last_loss: float | None = None
    last_val_loss: float | None = None
    last_saved_step: int | None = None
    resumed_from: str | None = None
    sigterm_received: bool = False
    """A SIGTERM arrived; the run stops after the step in progress."""


def data_identity(plan: RunPlan) -> dict[str, Any]:
    """What fixes the data order: a resumed run must match it (see `check_resumable`)."""
    return {
        "global_batch_size": plan.config.global_batch_size,
        "seed": plan.config.seed,
        "data_fingerprint": plan.data_fingerprint,
    }


def base_reference(config: TrainConfig) -> dict[str, str]:
    """The base a PEFT run's adapters belong to: --load and its fingerprint."""
    from megasft.checkpoint.fingerprint import checkpoint_fingerprint

    load = Path(config.load).resolve()
    return {"checkpoint": str(load), "sha256": checkpoint_fingerprint(load)}


def prepare_save_dir(config: TrainConfig, parallel: Parallel) -> None:
    """Create --save (rank 0), write the run's settings there as config.yaml, and remove the
    partial checkpoint a run killed while saving left behind.

    Args:
        config: the settings (`save` is the directory).
        parallel: this rank's place; only rank 0 writes.
    """
    from megasft.train.checkpointing import remove_partial_checkpoints

    if not parallel.is_main:
        return
    save_dir = Path(config.save)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "config.yaml").write_text(config.to_yaml())
    remove_partial_checkpoints(save_dir)


def restore(
    plan: RunPlan, parallel: Parallel, model: list[torch.nn.Module], optimizer
) -> LoopState:
    """The loop's state at the start: fresh, or read (with the model's and the optimizer's
    state, and this rank's random generators) from the checkpoint the plan resumes. Collective.

    Args:
        plan: the checked run; `plan.resume_from` is the checkpoint, or None for a fresh start.
        parallel: this rank's place in the process grid.
        model: the DDP-wrapped model chunks to load into.
        optimizer: megatron-core's optimizer to load into.

    Returns:
        The loop's state at the checkpoint's step (step 0 for a fresh start).

    Raises:
        ConfigError: the checkpoint was trained with another data order.
    """
    from megasft.train.checkpointing import check_resumable, check_same_base, load_checkpoint

    state = LoopState(monitor=StabilityMonitor(plan.config.spike_factor))
    if plan.resume_from is None:
        return state
    check_resumable(plan.resume_from, data_identity(plan))
    peft = plan.config.peft is not None
    check_same_base(plan.resume_from, base_reference(plan.config) if peft else None)
    saved = load_checkpoint(
        plan.resume_from, model, optimizer, world_size=parallel.world_size, adapters_only=peft
    )
    state.step = saved["step"]
    # Checkpoints written before skipped steps held the schedule back advanced it every step.
    state.updates = saved.get("updates", state.step)
    state.monitor.restore(saved["monitor"])
    state.totals = saved["totals"]
    state.last_val_loss = saved.get("last_val_loss")
    state.last_saved_step = state.step
    state.resumed_from = str(plan.resume_from)
    return state


def save(parts: Parts, state: LoopState) -> Path:
    """Write the checkpoint of the current step (collective: every rank calls it).

    Args:
        parts: the run's model, optimizer and settings.
        state: the loop's state, saved beside the model as train_state.json.

    Returns:
        The checkpoint's directory.
    """
    from megasft.train.checkpointing import adam_step, save_checkpoint

    config = parts.config
    train_state = {
        "step": state.step,
        "updates": state.updates,
        "adam_step": adam_step(parts.optimizer),
        "train_iters": config.train_iters,
        "consumed_samples": state.step * config.global_batch_size,
        "world_size": parts.parallel.world_size,
        "monitor": state.monitor.state(),
        "totals": state.totals,
        "last_val_loss": state.last_val_loss,
        "identity": data_identity(parts.plan),
        "config": asdict(config),
        # what the optimizer state's form depends on, as resolved (see megasft.train.resume)
        "layout": {"distributed_optimizer": parts.plan.distributed_optimizer},
    }
    if config.peft is not None:
        train_state["peft"] = {**asdict(config.peft_settings), "base": base_reference(config)}
    checkpoint = save_checkpoint(
        Path(config.save),
        state.step,
        parts.model,
        parts.optimizer,
        train_state,
        source_checkpoint=Path(config.load),
        keep=config.keep_checkpoints,
        adapters_only=config.peft is not None,
    )
    state.last_saved_step = state.step
    parts.reporting.note(f"megasft train: checkpoint {checkpoint}")
    return checkpoint
