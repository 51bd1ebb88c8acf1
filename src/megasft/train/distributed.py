"""Where this process sits in the training job: process group, megatron-core groups, device.

`megasft.megatron.parallel.initialize_parallel` covers TP and PP; training also needs context
parallelism and virtual pipeline stages, which megatron-core sets up in the same
`initialize_model_parallel` call, so the trainer makes that call itself here (with the same
device rules: the accelerator with NCCL/RCCL when there is one, else the CPU emulation layer
with gloo).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megasft.errors import ConfigError
from megasft.megatron.compat import warn_if_untested
from megasft.megatron.cpu import accelerator_present, enable_cpu_emulation
from megasft.train.config import TrainConfig

PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)
"""Long enough for the slowest collective we make: rank 0 waiting while a large checkpoint is
written by every rank."""


@dataclass(frozen=True)
class Parallel:
    """This rank's coordinates in the TP x CP x DP x PP grid, and its device."""

    device: torch.device
    on_accelerator: bool
    rank: int
    world_size: int
    tensor_rank: int
    pipeline_rank: int
    context_rank: int
    data_rank: int
    data_size: int
    owns_process_group: bool
    """This setup started torch.distributed (and so its teardown ends it)."""
    earlier_groups: frozenset = frozenset()
    """The process groups that existed before this setup (its teardown leaves them)."""

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one that logs, writes metrics and renames checkpoints."""
        return self.rank == 0


def under_torchrun() -> bool:
    """True inside a process that torchrun (or a PyTorchJob) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ
    )


def setup_parallel(config: TrainConfig) -> Parallel:
    """Start torch.distributed and megatron-core's parallel state for `config`'s layout."""
    from megatron.core import parallel_state, tensor_parallel

    on_accelerator = accelerator_present()
    if not on_accelerator:
        enable_cpu_emulation()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != config.world_size:
        raise ConfigError(
            f"the job has {world_size} processes, but the settings ask for {config.world_size} "
            f"(--nproc {config.nproc} x --nodes {config.nodes}); launch with matching numbers"
        )
    if on_accelerator:
        warn_if_untested()  # the CPU emulation layer refuses an untested version instead
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"  # RCCL on ROCm builds of torch, through the same name
    else:
        device = torch.device("cpu")
        backend = "gloo"
    owns_process_group = not dist.is_initialized()
    if owns_process_group:
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
        else:  # a plain `megasft train` without torchrun: a group of one
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    earlier_groups = frozenset(_process_groups())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_parallel,
        pipeline_model_parallel_size=config.pipeline_parallel,
        virtual_pipeline_model_parallel_size=config.virtual_pipeline_stages,
        context_parallel_size=config.context_parallel,
        expert_model_parallel_size=config.expert_parallel,
        expert_tensor_parallel_size=config.expert_tensor_size,
        distributed_timeout_minutes=int(PROCESS_GROUP_TIMEOUT.total_seconds() // 60),
    )
    pipeline_rank = parallel_state.get_pipeline_model_parallel_rank()
    # Different stages hold different layers: give each its own stream, as Megatron-LM does.
    torch.manual_seed(config.seed + 100 * pipeline_rank)
    tensor_parallel.model_parallel_cuda_manual_seed(config.seed + 100 * pipeline_rank)
    return Parallel(
        device=device,
        on_accelerator=on_accelerator,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tensor_rank=parallel_state.get_tensor_model_parallel_rank(),
        pipeline_rank=pipeline_rank,
        context_rank=parallel_state.get_context_parallel_rank(),
        data_rank=parallel_state.get_data_parallel_rank(),
        data_size=parallel_state.get_data_parallel_world_size(),
        owns_process_group=owns_process_group,
        earlier_groups=earlier_groups,
    )


def teardown_parallel(parallel: Parallel) -> None:
    """Undo `setup_parallel`: megatron-core's groups, and the process group if it started it
    (a caller that started torch.distributed itself can run several trainings in turn).

    Args:
        parallel: what `setup_parallel` returned.
    """
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if not dist.is_initialized():
        return
    if parallel.owns_process_group:
        dist.destroy_process_group()  # every group with it
        return
    # megatron-core only forgets its groups; each keeps gloo's threads to the process's end
    # (about 20 groups a setup), which slowed a process running many trainings to minutes.
    # The threads end once the model and optimizer that refer to a group are collected.
    names = dist.distributed_c10d._world.pg_names
    for group in sorted(set(_process_groups()) - parallel.earlier_groups, key=names.get):
        dist.destroy_process_group(group)


def _process_groups() -> list:
    """Every process group of this process, the default one included (torch keeps the list
    private: there is no public call for it)."""
    return list(dist.distributed_c10d._world.pg_map)
