"""Start torch.distributed and megatron-core's model-parallel state, on GPUs or on CPU.

One call for every entry point (trainer, tests, tools): under torchrun it joins the job
described by the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...); outside torchrun it starts
a one-process group. On a machine without an accelerator, or when asked for the CPU, it
switches on the CPU emulation layer and uses gloo; otherwise NCCL (RCCL on ROCm) on the
local rank's device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from megasft.errors import ConfigError
from megasft.megatron.compat import warn_if_untested
from megasft.megatron.cpu import accelerator_present, enable_cpu_emulation

Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class ParallelState:
    """Where this process sits in the job."""

    device: torch.device
    rank: int
    world_size: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    expert_parallel_size: int = 1
    """EP: the ranks an MoE layer's experts are split over (within the data-parallel ranks)."""

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_parallel_size * self.pipeline_parallel_size)


def initialize_parallel(
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    *,
    expert_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
    device: Device = "auto",
    seed: int = 1234,
) -> ParallelState:
    """Initialise torch.distributed, megatron-core's `parallel_state` and its RNG tracker.

    `device="auto"` uses the accelerator when there is one, else the CPU; `"cpu"` on a machine
    with an accelerator is refused by the emulation layer. The data-parallel size is what is
    left of the world: world_size / (TP * PP). MoE layers regroup the same ranks: their
    experts are split over EP ranks and each expert's matrices over ETP (default TP) ranks,
    so world_size / PP must be a multiple of ETP * EP.
    """
    from megatron.core import parallel_state, tensor_parallel

    use_cpu = device == "cpu" or (device == "auto" and not accelerator_present())
    if device == "cuda" and not accelerator_present():
        raise ConfigError("device 'cuda' was asked for, but no CUDA/ROCm device is present")
    if use_cpu:
        enable_cpu_emulation()

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size % (tensor_parallel_size * pipeline_parallel_size):
        raise ConfigError(
            f"{world_size} processes cannot be split into TP={tensor_parallel_size} x "
            f"PP={pipeline_parallel_size} groups; use a multiple of "
            f"{tensor_parallel_size * pipeline_parallel_size} processes"
        )
    expert_tensor_parallel_size = expert_tensor_parallel_size or tensor_parallel_size
    expert_ranks = expert_tensor_parallel_size * expert_parallel_size * pipeline_parallel_size
    if world_size % expert_ranks:
        raise ConfigError(
            f"{world_size} processes cannot be split into EP={expert_parallel_size} x "
            f"ETP={expert_tensor_parallel_size} x PP={pipeline_parallel_size} groups for the "
            f"MoE layers; use a multiple of {expert_ranks} processes"
        )
    if use_cpu:
        torch_device = torch.device("cpu")
        backend = "gloo"
    else:
        warn_if_untested()  # the CPU emulation layer refuses an untested version instead
        torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(torch_device)
        backend = "nccl"

    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            # Outside torchrun: a group of one, rendezvous through an in-memory store.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        expert_model_parallel_size=expert_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelState(
        device=torch_device,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        expert_parallel_size=expert_parallel_size,
    )


def destroy_parallel() -> None:
    """Undo `initialize_parallel` (megatron-core state, then the process group)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
