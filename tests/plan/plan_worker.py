"""Builds megatron-core models on CPU and measures what `megasft plan` predicts.

The tests never switch megatron-core's CPU emulation on in the pytest process (it is
process-wide); they run this script and compare what it writes:

    python plan_worker.py static WORK                          # one process
    torchrun --nproc-per-node 2 plan_worker.py static WORK     # two processes, gloo
    python plan_worker.py activations WORK                     # one process

WORK/spec.json lists the scenarios (see conftest.py). `static` builds each scenario whose
world size matches with the trainer's own parallel setup, DDP and optimizer settings, takes
one optimizer step (so Adam's states exist) and records, per rank, every parameter (name,
shape) and the bytes of the weights, gradient buffers, fp32 main weights and Adam states, by
the storages that hold them. `activations` runs one micro-batch forward and backward through
the trainer's `forward_step` and `loss_func` and records the memory in use after the forward
and its peak during forward and backward, above what was in use before (glibc's count of
allocated bytes, read after every operator).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode


def main() -> None:
    mode, work = sys.argv[1], Path(sys.argv[2])
    spec = json.loads((work / "spec.json").read_text())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_initialized():  # one group for every scenario; each setup reuses it
        if "RANK" in os.environ:
            dist.init_process_group("gloo")
        else:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    results = {}
    for scenario in spec[mode]:
        if scenario["world_size"] != world_size:
            continue
        measure = measure_static if mode == "static" else measure_activations
        results[scenario["name"]] = measure(scenario)
    rank = dist.get_rank() if dist.is_initialized() else 0
    (work / f"{mode}_world{world_size}_rank{rank}.json").write_text(json.dumps(results))


# --- building the model as the trainer does ----------------------------------------------------


def build(scenario: dict, overrides: dict | None = None):
    """(parallel, config, DDP chunks, optimizer) as `megasft.train.recipe.setup` builds them."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megasft.megatron.architecture import ModelArchitecture
    from megasft.megatron.builder import build_model, transformer_config
    from megasft.train.config import TrainConfig
    from megasft.train.distributed import setup_parallel

    architecture = ModelArchitecture.from_json(json.dumps(scenario["architecture"]))
    config = TrainConfig(
        data=".",
        load=".",
        save=".",
        train_iters=1,
        nproc=scenario["world_size"],
        tensor_parallel=scenario["tp"],
        pipeline_parallel=scenario["pp"],
        virtual_pipeline_stages=scenario.get("vp"),
        precision=scenario["precision"],
        distributed_optimizer=scenario["distributed_optimizer"],
        micro_batch_size=scenario.get("micro_batch_size", 1),
        global_batch_size=scenario.get("micro_batch_size", 1) * 8,
    )
    parallel = setup_parallel(config)
    bf16 = config.precision == "bf16"
    model_config = transformer_config(
        architecture,
        tensor_parallel_size=config.tensor_parallel,
        pipeline_parallel_size=config.pipeline_parallel,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        overrides=dict(
            virtual_pipeline_model_parallel_size=config.virtual_pipeline_stages,
            calculate_per_token_loss=True,
            **(overrides or {}),
        ),
    )
    chunks = [
        build_model(
            architecture, model_config, vp_stage=stage if config.virtual_pipeline_stages else None
        )
        for stage in range(config.virtual_pipeline_stages or 1)
    ]
    if bf16:  # as the trainer: every parameter in bf16
        for chunk in chunks:
            for parameter in chunk.parameters():
                if parameter.dtype == torch.float32:
                    parameter.data = parameter.data.to(torch.bfloat16)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=scenario.get("bucket_size") is not None,
        use_distributed_optimizer=config.distributed_optimizer,
        bucket_size=scenario.get("bucket_size"),
    )
    model = [
        DistributedDataParallel(model_config, ddp_config, chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-4,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=config.distributed_optimizer,
        ),
        model,
    )
    return architecture, config, parallel, model, optimizer


def storage_bytes(tensors) -> tuple[int, set[int]]:
    """Bytes of the distinct storages behind `tensors`, and their addresses."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()), set(storages)


def inner_optimizers(optimizer):
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]


def measure_static(scenario: dict) -> dict:
    from megasft.train.distributed import teardown_parallel

    _, _, parallel, model, optimizer = build(scenario)
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.step()  # zero gradients: Adam creates its states and changes nothing
    parameters = [p for chunk in model for p in chunk.module.parameters()]
    weights, weight_storages = storage_bytes(parameters)
    gradients, _ = storage_bytes(p.main_grad for p in parameters)
    main_parameters = [
        p
        for inner in inner_optimizers(optimizer)
        for group in inner.param_groups
        for p in group["params"]
        if p.untyped_storage().data_ptr() not in weight_storages
    ]
    main_weights, _ = storage_bytes(main_parameters)
    states = [
        state[key]
        for inner in inner_optimizers(optimizer)
        for state in inner.state.values()
        for key in ("exp_avg", "exp_avg_sq")
    ]
    result = {
        "pipeline_rank": parallel.pipeline_rank,
        "data_rank": parallel.data_rank,
        "tensor_rank": parallel.tensor_rank,
        "chunks": [
            [[name, list(p.shape)] for name, p in chunk.module.named_parameters()]
            for chunk in model
        ],
        "weights": weights,
        "gradients": gradients,
        "main_weights": main_weights,
        "optimizer_states": storage_bytes(states)[0],
    }
    teardown_parallel(parallel)
    return result


# --- activations ---------------------------------------------------------------------------------


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2


def allocated_bytes() -> int:
    """Bytes allocated by malloc and not yet freed (heap chunks plus mmapped blocks): where
    torch's CPU allocator takes every tensor's memory from."""
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakMemory(TorchDispatchMode):
    """Tracks the most memory allocated after any operator while active."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = allocated_bytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, allocated_bytes())
        return result


def measure_activations(scenario: dict) -> dict:
    from megasft.train.data import MicroBatch
    from megasft.train.distributed import teardown_parallel
    from megasft.train.step import bshd_inputs, forward_step

    architecture, config, parallel, model, optimizer = build(
        scenario, overrides=scenario.get("overrides")
    )
    rows, seq_length = config.micro_batch_size, scenario["seq_length"]
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, architecture.vocab_size, (rows, seq_length), generator=generator)
    positions = torch.arange(seq_length).expand(rows, seq_length).contiguous()
    mask = torch.ones(rows, 1, seq_length, seq_length, dtype=torch.bool).triu(1)  # causal
    batch = MicroBatch(
        tokens=tokens,
        position_ids=positions,
        loss_mask=torch.ones_like(tokens),
        attention_mask=mask,
        seq_lengths=[[seq_length]] * rows,
    )
    inputs = bshd_inputs(batch, parallel.device)
    chunk = model[0]
    chunk.zero_grad_buffer()

    def step():
        output, loss_function = forward_step(
            iter([inputs]), chunk, vocab_size=architecture.vocab_size
        )
        loss_sum, _, _ = loss_function(output)
        return loss_sum

    step().backward()  # once before measuring: lazily made buffers exist from here on
    chunk.zero_grad_buffer()
    gc.collect()  # what earlier scenarios left must not be freed while measuring
    gc.disable()
    try:
        before = allocated_bytes()
        with PeakMemory() as peak:
            loss = step()
            after_forward = allocated_bytes()
            loss.backward()
        del loss
    finally:
        gc.enable()
    result = {
        "stored": after_forward - before,
        "peak": peak.peak - before,
    }
    teardown_parallel(parallel)
    return result


if __name__ == "__main__":
    main()
