"""The static memory of one rank: weights, gradients, fp32 main weights, Adam states.

megatron-core's DistributedDataParallel keeps each model chunk's gradients in one contiguous
fp32 buffer (the trainer reduces gradients in fp32), and under the distributed optimizer its
weights too, padded so that every bucket divides evenly over the data x context-parallel
ranks. `buffer_layout` reproduces that layout (megatron-core 0.16's `_ParamAndGradBuffer`:
parameters in reverse order, each started at a multiple of 64 elements, each bucket padded
to a multiple of lcm(ranks, 128), the shared embedding in a bucket of its own), so the
distributed optimizer's shard on each rank, and so its fp32 main weights and Adam states,
come out to the element. With EP > 1 the experts' weights have buffers of their own, sharded
over the expert-data-parallel ranks. Without the distributed optimizer nothing is padded or
sharded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megasft.plan.layout import Layout
from megasft.plan.parameters import PlannedParameter

PARAMETER_START_MULTIPLE = 64
BUCKET_MULTIPLE = 128
GRADIENT_BYTES = 4
"""Gradients are accumulated and reduced in fp32 (`grad_reduce_in_fp32`)."""
MAIN_WEIGHT_BYTES = 4
ADAM_STATE_BYTES = 8
"""Adam's two fp32 moments per main weight (exp_avg, exp_avg_sq)."""


@dataclass(frozen=True)
class BufferLayout:
    """Where each parameter of one chunk sits in its DDP buffer."""

    numel: int
    """Elements of the buffer, padding included."""
    buckets: tuple[tuple[int, int], ...]
    """[start, end) of each bucket."""
    ranges: tuple[tuple[int, int, int], ...]
    """(start, end, bucket) of each parameter, in the order the parameters were given."""


def bucket_size(layout: Layout, stage: int, chunk: int) -> int | None:
    """Elements per gradient bucket, as megatron-core's DDP chooses: max(4e7, 1e6 x DP) on
    the first pipeline stage's first chunk when gradients are reduced during backward
    (accelerators), else one bucket (None)."""
    if not layout.overlap_grad_reduce or stage > 0 or chunk > 0:
        return None
    return max(40_000_000, 1_000_000 * layout.data_parallel)


def buffer_layout(
    parameters: list[PlannedParameter],
    *,
    shards: int,
    distributed_optimizer: bool,
    bucket_elements: int | None,
) -> BufferLayout:
    """The DDP buffer of one model chunk.

    Args:
        parameters: the chunk's parameters in `named_parameters()` order.
        shards: data x context-parallel ranks (the distributed optimizer's).
        distributed_optimizer: pad for the distributed optimizer.
        bucket_elements: close a bucket once it holds this many elements (None: one bucket).

    Returns:
        The layout.
    """
    pad = math.lcm(shards, BUCKET_MULTIPLE)
    buckets: list[tuple[int, int]] = []
    ranges: dict[int, tuple[int, int, int]] = {}
    bucket_start = start = 0
    in_bucket = 0

    def close_bucket(end: int) -> int:
        nonlocal bucket_start, in_bucket
        if distributed_optimizer:
            end = -(-end // pad) * pad
        buckets.append((bucket_start, end))
        bucket_start, in_bucket = end, 0
        return end

    # Reverse order: roughly the order backward produces the gradients in.
    for index in reversed(range(len(parameters))):
        parameter = parameters[index]
        if distributed_optimizer:
            start = -(-start // PARAMETER_START_MULTIPLE) * PARAMETER_START_MULTIPLE
        own_bucket = parameter.shared_embedding and distributed_optimizer
        if own_bucket and in_bucket:
            start = close_bucket(start)
        end = start + parameter.numel
        ranges[index] = (start, end, len(buckets))
        in_bucket += 1
        if (bucket_elements is not None and end - bucket_start >= bucket_elements) or own_bucket:
            start = close_bucket(end)
        else:
            start = end
    if in_bucket:
        close_bucket(end)
    numel = buckets[-1][1] if buckets else 0
    return BufferLayout(numel, tuple(buckets), tuple(ranges[i] for i in range(len(parameters))))


def shard_elements(buffer: BufferLayout, shards: int) -> list[int]:
    """Parameter elements (padding excluded) in each rank's shard of the buffer: the fp32 main
    weights and Adam states that rank's distributed optimizer keeps.

    Args:
        buffer: a chunk's buffer layout (padded for the distributed optimizer).
        shards: data x context-parallel ranks.

    Returns:
        Elements per rank, rank 0 first.
    """
    per_rank = [0] * shards
    for start, end, bucket in buffer.ranges:
        bucket_start, bucket_end = buffer.buckets[bucket]
        shard = (bucket_end - bucket_start) // shards
        first = (start - bucket_start) // shard
        last = min((end - 1 - bucket_start) // shard, shards - 1) if end > start else first - 1
        for rank in range(first, last + 1):
            low = bucket_start + rank * shard
            per_rank[rank] += min(end, low + shard) - max(start, low)
    return per_rank


@dataclass(frozen=True)
class StaticMemory:
    """Bytes of one rank's static parts."""

    parameters: int
    """Parameters this rank holds (elements, no padding)."""
    trainable: int
    """Of which trained (all of them, but for PEFT's frozen base)."""
    weights: int
    gradients: int
    main_weights: int
    optimizer_states: int
    fp8_weights: int = 0
    """With FP8: Transformer Engine's FP8 copy of each layer's weight and of its transpose."""

    @property
    def total(self) -> int:
        return (
            self.weights + self.gradients + self.main_weights + self.optimizer_states
            + self.fp8_weights
        )  # fmt: skip


def rank_static_memory(
    chunks: list[list[PlannedParameter]],
    layout: Layout,
    stage: int,
    shard_rank: int,
    bucket_elements: list[int | None] | None = None,
    expert_shard_rank: int = 0,
) -> StaticMemory:
    """The static parts of one rank.

    Args:
        chunks: the stage's model chunks, each its parameters (`chunk_parameters`).
        layout: precision, distributed optimizer, data x context-parallel ranks.
        stage: the pipeline rank (decides the gradient buckets).
        shard_rank: the rank among the data x context-parallel ranks.
        bucket_elements: each chunk's bucket size, where not megatron-core's default.
        expert_shard_rank: the rank among the expert-data-parallel ranks (EP > 1).

    Returns:
        Bytes per part.
    """
    weight_bytes = layout.element_bytes
    parameters = sum(p.numel for chunk in chunks for p in chunk)
    # DDP and the optimizer hold the trainable parameters only (all of them without PEFT).
    trainable = sum(p.numel for chunk in chunks for p in chunk if p.trainable)
    frozen_weights = (parameters - trainable) * weight_bytes
    fp8 = 0
    if layout.fp8 != "none":
        fp8 = 2 * sum(p.numel for chunk in chunks for p in chunk if p.fp8)
    main_bytes = MAIN_WEIGHT_BYTES if layout.precision == "bf16" else 0
    if not layout.distributed_optimizer:
        return StaticMemory(
            parameters=parameters,
            trainable=trainable,
            weights=frozen_weights + trainable * weight_bytes,
            gradients=trainable * GRADIENT_BYTES,
            main_weights=trainable * main_bytes,
            optimizer_states=trainable * ADAM_STATE_BYTES,
            fp8_weights=fp8,
        )
    if bucket_elements is None:
        bucket_elements = [bucket_size(layout, stage, index) for index in range(len(chunks))]
    padded = shard = 0
    # With EP > 1 the experts' weights have buffers of their own, sharded over fewer ranks.
    for expert_parallel, shards, rank in (
        (False, layout.gradient_shards, shard_rank),
        (True, layout.expert_data_parallel, expert_shard_rank),
    ):
        for chunk, size in zip(chunks, bucket_elements, strict=True):
            held = [p for p in chunk if p.trainable and p.expert_parallel == expert_parallel]
            if held:
                buffer = buffer_layout(
                    held, shards=shards, distributed_optimizer=True, bucket_elements=size
                )
                padded += buffer.numel
                shard += shard_elements(buffer, shards)[rank]
    return StaticMemory(
        parameters=parameters,
        trainable=trainable,
        weights=frozen_weights + padded * weight_bytes,  # trained ones live in the buffers
        gradients=padded * GRADIENT_BYTES,
        main_weights=shard * main_bytes,  # fp32 parameters are their own main weights
        optimizer_states=shard * ADAM_STATE_BYTES,
        fp8_weights=fp8,
    )


def static_memory(chunks: list[list[PlannedParameter]], layout: Layout, stage: int) -> StaticMemory:
    """The static parts of the fullest data-parallel rank of one pipeline stage.

    Args:
        chunks: the stage's model chunks, each its parameters (`chunk_parameters`).
        layout: precision, distributed optimizer, data x context-parallel ranks.
        stage: the pipeline rank.

    Returns:
        Bytes per part, of the rank with the most (with EP > 1: the fullest shard of the
        dense buffers with the fullest of the experts' buffers).
    """
    if not layout.distributed_optimizer:
        return rank_static_memory(chunks, layout, stage, 0)
    dense = max(
        range(layout.gradient_shards),
        key=lambda rank: rank_static_memory(chunks, layout, stage, rank).total,
    )
    has_experts = any(p.expert_parallel for chunk in chunks for p in chunk)
    return max(
        (
            rank_static_memory(chunks, layout, stage, dense, expert_shard_rank=rank)
            for rank in range(layout.expert_data_parallel if has_experts else 1)
        ),
        key=lambda memory: memory.total,
    )
