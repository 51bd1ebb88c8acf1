"""Builds megatron-core models on CPU and measures what `megasft plan` predicts.

The tests never switch megatron-core's CPU emulation on in the pytest process (it is
process-wide); they run this script and compare what it writes:

    python plan_worker.py static WORK                          # one process
    torchrun --nproc-per-node 2 plan_worker.py static WORK     # two processes, gloo
    python plan_worker.py activations WORK                     # one process
    torchrun --nproc-per-node 2 plan_worker.py activations WORK

WORK/spec.json lists the scenarios (see conftest.py). Each scenario whose world size matches is
built by the trainer itself (`setup_parallel`, `setup_model`, `setup_optimizer`) from its
TrainConfig settings. `static` takes one optimizer step (so Adam's states exist) and records,
per rank, every parameter (name, shape) and the bytes of the weights, gradient buffers, fp32
main weights and Adam states, by the storages that hold them. `activations` runs one
micro-batch forward and backward through the trainer's `forward_step` and `loss_func` and
records the memory in use after the forward and its peak during forward and backward, above
what was in use before (glibc's count of allocated bytes, read after every operator). Both
record the process's threads after each scenario.
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
        # teardown_parallel destroyed the scenario's process groups; their gloo threads end
        # when the model and optimizer that refer to them are collected (left to the
        # collector's own pace, a two-process run kept thousands, and ran minutes longer)
        gc.collect()
        if len(results) == 1:
            gc.freeze()  # what is alive now lives on: later collections need not scan it
        results[scenario["name"]]["threads"] = len(os.listdir("/proc/self/task"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    (work / f"{mode}_world{world_size}_rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()  # left to exit, gloo hangs there with megatron-core 0.19


# --- building the model as the trainer does ----------------------------------------------------


def build(scenario: dict):
    """(architecture, config, parallel, DDP chunks, optimizer), built by the trainer itself
    (`megasft.train.build.setup_model` and `setup_optimizer`) with the scenario's settings."""
    import megatron.core.distributed

    import megasft.megatron.weights
    from megasft.megatron.architecture import ModelArchitecture
    from megasft.megatron.attention import choose_attention
    from megasft.train.build import setup_model, setup_optimizer
    from megasft.train.checks import RunPlan
    from megasft.train.config import TrainConfig
    from megasft.train.distributed import setup_parallel

    architecture = ModelArchitecture.from_json(json.dumps(scenario["architecture"]))
    rows = scenario.get("micro_batch_size", 1)
    config = TrainConfig(
        data=".",
        load=".",
        save=".",
        train_iters=1,
        nproc=scenario["world_size"],
        tensor_parallel=scenario["tp"],
        pipeline_parallel=scenario["pp"],
        virtual_pipeline_stages=scenario.get("vp"),
        expert_parallel=scenario.get("ep", 1),
        expert_tensor_parallel=scenario.get("etp"),
        precision=scenario["precision"],
        distributed_optimizer=scenario["distributed_optimizer"],
        micro_batch_size=rows,
        global_batch_size=rows * 8,
        recompute=scenario.get("recompute", "none"),
        recompute_layers=scenario.get("recompute_layers"),
        hidden_dropout=scenario.get("hidden_dropout", 0.0),
        attention_dropout=scenario.get("attention_dropout", 0.0),
        **scenario.get("peft", {}),
    )
    parallel = setup_parallel(config)
    plan = RunPlan(
        config=config,
        architecture=architecture,
        seq_length=scenario.get("seq_length", 8),
        train_rows=8,
        val_rows=0,
        data_fingerprint="",
        resume_from=None,
        # as megasft.train.checks.plan_run resolves them on this machine (a CPU)
        attention=choose_attention(
            config.attention,
            precision=config.precision,
            on_accelerator=parallel.on_accelerator,
            transformer_engine=False,
        ),
        distributed_optimizer=scenario["distributed_optimizer"],
    )
    load_weights = megasft.megatron.weights.load_weights
    # the weights stay as initialised: they do not change the memory
    megasft.megatron.weights.load_weights = lambda chunks, path: None
    ddp_config = megatron.core.distributed.DistributedDataParallelConfig
    if scenario.get("bucket_size"):  # the trainer buckets gradients on GPUs only

        def bucketed(**fields):
            bucketing = dict(overlap_grad_reduce=True, bucket_size=scenario["bucket_size"])
            return ddp_config(**{**fields, **bucketing})

        megatron.core.distributed.DistributedDataParallelConfig = bucketed
    try:
        model = setup_model(plan, parallel)
    finally:
        megatron.core.distributed.DistributedDataParallelConfig = ddp_config
        megasft.megatron.weights.load_weights = load_weights
    return architecture, config, parallel, model, setup_optimizer(plan, model)


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
    from megatron.core import parallel_state

    from megasft.train.distributed import teardown_parallel

    _, _, parallel, model, optimizer = build(scenario)
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.step()  # zero gradients: Adam creates its states and changes nothing
    parameters = [p for chunk in model for p in chunk.module.parameters()]
    weights, weight_storages = storage_bytes(parameters)
    gradients, _ = storage_bytes(p.main_grad for p in parameters if p.requires_grad)
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
        "expert_data_rank": parallel_state.get_expert_data_parallel_rank(),
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
    from megatron.core import tensor_parallel

    from megasft.train.data import MicroBatch
    from megasft.train.distributed import teardown_parallel
    from megasft.train.step import bshd_inputs, forward_step

    architecture, config, parallel, model, optimizer = build(scenario)
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

    def same_draws():
        # Both passes draw the same dropout masks, so the measured one routes tokens to the
        # experts as the first did: on CPU a bf16 matrix multiply caches a kernel per shape
        # (an expert's is its token count), which would count as kept.
        torch.manual_seed(0)
        tensor_parallel.model_parallel_cuda_manual_seed(0)

    same_draws()
    step().backward()  # once before measuring: lazily made buffers exist from here on
    chunk.zero_grad_buffer()
    with torch.no_grad():
        # An MoE layer recomputed in backward leaves tensors referenced until the next
        # forward, which would free them while measuring.
        step()
    gc.collect()  # what earlier scenarios left must not be freed while measuring
    gc.disable()
    try:
        same_draws()
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
