"""`plan_memory`: the memory of every pipeline stage of a run, its worst rank, and a verdict.

Per rank: the static parts (`buffers.static_memory`: exact), the activations
(`activations.stage_activations`: Korthikanti et al.'s count) and an allowance for what
neither counts, stated in `ALLOWANCE_FIXED_GIB` and `FRAGMENTATION`. `suggestions` re-plans
the run with one setting changed at a time and names the changes that fit. See docs/plan.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from megasft.errors import ConfigError
from megasft.megatron.architecture import ModelArchitecture
from megasft.plan.activations import Activations, stage_activations
from megasft.plan.buffers import StaticMemory, static_memory
from megasft.plan.devices import GIB
from megasft.plan.layout import Layout, check_layout
from megasft.plan.parameters import chunk_parameters, model_parameter_count

ALLOWANCE_FIXED_GIB = 3.0
"""Memory a process uses outside the tensors counted here: the CUDA/HIP context, the
communicators' buffers (NCCL/RCCL, one set per process group), BLAS and Transformer Engine
workspaces."""
FRAGMENTATION = 0.10
"""The caching allocator's fragmentation, as a fraction of the activations (static buffers are
allocated once, whole; activations are freed and re-allocated every micro-batch)."""


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage's worst rank."""

    stage: int
    static: StaticMemory
    activations: Activations

    @property
    def activation_bytes(self) -> int:
        return self.activations.stored + self.activations.transient

    @property
    def allowance(self) -> int:
        return int(ALLOWANCE_FIXED_GIB * GIB + FRAGMENTATION * self.activation_bytes)

    @property
    def total(self) -> int:
        return self.static.total + self.activation_bytes + self.allowance


@dataclass(frozen=True)
class MemoryPlan:
    """The memory of a run on its devices."""

    architecture: ModelArchitecture
    layout: Layout
    device: str
    device_memory: int
    """Bytes per device."""
    model_parameters: int
    stages: tuple[StagePlan, ...]

    @property
    def worst(self) -> StagePlan:
        """The stage whose rank needs the most memory."""
        return max(self.stages, key=lambda stage: stage.total)

    @property
    def fits(self) -> bool:
        return self.worst.total <= self.device_memory


def plan_memory(
    architecture: ModelArchitecture, layout: Layout, device: str, device_memory: int
) -> MemoryPlan:
    """Plan the memory of every pipeline stage.

    Args:
        architecture: the model.
        layout: the run's layout.
        device: the device's name (for the report).
        device_memory: bytes per device.

    Returns:
        The plan.

    Raises:
        ConfigError: the layout does not suit the model (`check_layout`).
    """
    check_layout(architecture, layout)
    stages = []
    for stage in range(layout.pipeline_parallel):
        chunks = [
            chunk_parameters(architecture, layout, stage, chunk)
            for chunk in range(layout.virtual_pipeline_stages)
        ]
        stages.append(
            StagePlan(
                stage=stage,
                static=static_memory(chunks, layout, stage),
                activations=stage_activations(architecture, layout, stage),
            )
        )
    return MemoryPlan(
        architecture=architecture,
        layout=layout,
        device=device,
        device_memory=device_memory,
        model_parameters=model_parameter_count(architecture),
        stages=tuple(stages),
    )


@dataclass(frozen=True)
class Change:
    """One setting to change, as flags, and what it does to the layout."""

    flags: str
    apply: Callable[[Layout], Layout | None]
    """The changed layout, or None where the change does not apply."""


def _doubled(name: str, flag: str) -> Change:
    return Change(
        f"{flag} x2",
        lambda layout: layout.replace(**{name: 2 * getattr(layout, name)}),
    )


CHANGES: tuple[Change, ...] = (
    Change(
        "--recompute selective",
        lambda layout: (
            layout.replace(recompute="selective") if layout.recompute == "none" else None
        ),
    ),
    Change(
        "--recompute full",
        lambda layout: (
            layout.replace(recompute="full", recompute_layers=None)
            if layout.recompute != "full" or layout.recompute_layers
            else None
        ),
    ),
    Change(
        "--micro-batch-size /2",
        lambda layout: (
            layout.replace(micro_batch_size=layout.micro_batch_size // 2)
            if layout.micro_batch_size > 1
            else None
        ),
    ),
    Change(
        "--distributed-optimizer",
        lambda layout: (
            layout.replace(distributed_optimizer=True)
            if not layout.distributed_optimizer and layout.gradient_shards > 1
            else None
        ),
    ),
    _doubled("tensor_parallel", "--tp"),
    _doubled("pipeline_parallel", "--pp"),
    _doubled("world_size", "--nodes"),
)
"""What `suggestions` tries, one at a time, in this order. A way of training with less memory
(LoRA, when megasft has it) adds its change here."""


def suggestions(plan: MemoryPlan) -> list[tuple[str, MemoryPlan]]:
    """The single changes that make a plan fit, each with its plan.

    Args:
        plan: a plan that does not fit.

    Returns:
        (the change as flags, with its new value, the new plan) for each change that fits, in
        `CHANGES` order.
    """
    found = []
    for change in CHANGES:
        try:
            layout = change.apply(plan.layout)
            if layout is None:
                continue
            changed = plan_memory(plan.architecture, layout, plan.device, plan.device_memory)
        except ConfigError:  # the change does not suit this model or world size
            continue
        if changed.fits:
            found.append((_flags(change, plan.layout, layout), changed))
    return found


def _flags(change: Change, before: Layout, after: Layout) -> str:
    """The change as the flags to give, with their new values."""
    numbers = {
        "--tp": after.tensor_parallel,
        "--pp": after.pipeline_parallel,
        "--micro-batch-size": after.micro_batch_size,
    }
    flag = change.flags.split(" ")[0]
    if flag in numbers:
        return f"{flag} {numbers[flag]}"
    if flag == "--nodes":
        return f"twice the GPUs ({after.world_size}; --nodes or --nproc)"
    return change.flags
