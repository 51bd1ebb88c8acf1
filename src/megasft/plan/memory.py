"""`plan_memory`: the memory of every pipeline stage of a run, its worst rank, and a verdict.

Per rank: the static parts (`buffers.static_memory`: exact), the activations
(`activations.stage_activations`: Korthikanti et al.'s count) and an allowance for what
neither counts, stated in `ALLOWANCE_FIXED_GIB` and `FRAGMENTATION`. `suggestions` re-plans
the run with one setting changed at a time and names the changes that fit. See docs/plan.md.
"""

from __future__ import annotations

import dataclasses
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
    """One setting to change: what it does to the layout, and the flags that do it."""

    apply: Callable[[Layout], Layout | None]
    """The changed layout, or None where the change does not apply."""
    flags: Callable[[Layout], str]
    """The flags, given the changed layout."""


def _when(condition: Callable[[Layout], bool], **changes) -> Callable[[Layout], Layout | None]:
    return lambda layout: layout.replace(**changes) if condition(layout) else None


CHANGES: tuple[Change, ...] = (
    Change(
        _when(lambda layout: layout.recompute == "none", recompute="selective"),
        lambda _: "--recompute selective",
    ),
    Change(
        _when(
            lambda layout: layout.recompute != "full" or layout.recompute_layers is not None,
            recompute="full",
            recompute_layers=None,
        ),
        lambda _: "--recompute full",
    ),
    Change(
        lambda layout: (
            layout.replace(micro_batch_size=layout.micro_batch_size // 2)
            if layout.micro_batch_size > 1
            else None
        ),
        lambda layout: f"--micro-batch-size {layout.micro_batch_size}",
    ),
    Change(
        _when(
            lambda layout: not layout.distributed_optimizer and layout.gradient_shards > 1,
            distributed_optimizer=True,
        ),
        lambda _: "--distributed-optimizer",
    ),
    Change(
        lambda layout: layout.replace(tensor_parallel=2 * layout.tensor_parallel),
        lambda layout: f"--tp {layout.tensor_parallel}",
    ),
    Change(
        lambda layout: layout.replace(pipeline_parallel=2 * layout.pipeline_parallel),
        lambda layout: f"--pp {layout.pipeline_parallel}",
    ),
    Change(  # refused for a dense model, or where EP would exceed the experts
        lambda layout: layout.replace(expert_parallel=2 * layout.expert_parallel),
        lambda layout: f"--ep {layout.expert_parallel}",
    ),
    Change(
        lambda layout: layout.replace(world_size=2 * layout.world_size),
        lambda layout: f"twice the GPUs ({layout.world_size}: --nodes or --nproc)",
    ),
)
"""What `suggestions` tries, one at a time, in this order (then each PEFT method)."""


def _peft_changes(architecture: ModelArchitecture) -> tuple[Change, ...]:
    """Training adapters of each registered PEFT method (with its default settings; on an MoE
    model's attention projections only) instead of the whole model."""
    from megasft.megatron.peft import method_names
    from megasft.train.config import MLP_LINEARS, TrainConfig

    changes = []
    for name in method_names():
        settings = TrainConfig(data=".", load=".", save=".", train_iters=1, peft=name)
        peft, flags = settings.peft_settings, f"--peft {name}"
        if architecture.moe is not None:
            targets = tuple(target for target in peft.targets if target not in MLP_LINEARS)
            peft = dataclasses.replace(peft, targets=targets)
            flags += f" --lora-targets {','.join(targets)}"
        changes.append(
            Change(
                lambda layout, peft=peft: (
                    layout.replace(peft=peft) if layout.peft is None else None
                ),
                lambda _, flags=flags: flags,
            )
        )
    return tuple(changes)


def suggestions(plan: MemoryPlan) -> list[tuple[str, MemoryPlan]]:
    """The single changes that make a plan fit, each with its plan.

    Args:
        plan: a plan that does not fit.

    Returns:
        (the flags that make the change, the new plan) for each change that fits, in
        `CHANGES` order.
    """
    found = []
    for change in CHANGES + _peft_changes(plan.architecture):
        try:
            layout = change.apply(plan.layout)
            if layout is None:
                continue
            changed = plan_memory(plan.architecture, layout, plan.device, plan.device_memory)
        except ConfigError:  # the change does not suit this model or world size
            continue
        if changed.fits:
            found.append((change.flags(layout), changed))
    return found
