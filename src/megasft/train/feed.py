"""What the pipeline schedule pulls: this rank's rows of each step, as the model's inputs.

`setup_data` opens the prepared splits (memory-mapped Arrow) and the step sampler; `RunData`
turns a micro-batch's row indices into `ModelInputs` in the run's layout ([b, s] rows with a
mask, or packed thd with cu_seqlens on GPUs), and gives the schedule its iterators and shapes.
See megasft.train.step for the layouts and megasft.train.data for the data order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from megasft.data.store import open_split
from megasft.train.build import uses_sequence_parallel
from megasft.train.checks import RunPlan
from megasft.train.data import MicroBatch, StepSampler, collate
from megasft.train.distributed import Parallel
from megasft.train.step import ModelInputs, bshd_inputs, thd_inputs

PAD_ID = 0
"""Token id of padding positions. Any id works: padding is never a target and sits in its own
attention block."""


@dataclass(frozen=True)
class RunData:
    """This rank's view of the data, and how its micro-batches reach the model."""

    sampler: StepSampler
    train: pa.Table
    val: pa.Table | None
    """None when the dataset has no val split."""
    val_rows: int
    seq_length: int
    """Tokens per row of the dataset."""
    micro_batch_size: int
    packed: bool
    """The packed (thd) layout instead of rows with a mask."""
    device: torch.device
    context_parallel: int
    context_rank: int
    tensor_parallel: int
    sequence_parallel: bool

    def inputs(self, table: pa.Table, indices: np.ndarray) -> ModelInputs:
        """The micro-batch of these rows of `table` in the layout of this run, on the device."""
        batch: MicroBatch = collate(
            table,
            indices,
            self.seq_length,
            PAD_ID,
            rows=self.micro_batch_size,
            attention_mask=not self.packed,
        )
        if not self.packed:
            return bshd_inputs(batch, self.device)
        return thd_inputs(
            batch,
            self.device,
            context_parallel=self.context_parallel,
            context_rank=self.context_rank,
            total_multiple=self.tensor_parallel if self.sequence_parallel else 1,
        )

    def iterators(
        self, table: pa.Table, batches: list[np.ndarray], chunks: int
    ) -> Iterator[ModelInputs] | list[Iterator[ModelInputs]]:
        """What the schedule pulls micro-batches from: one lazy iterator, or with virtual
        pipeline stages (`chunks` > 1) one iterator per model chunk over the same micro-batches.
        """
        if chunks == 1:
            return (self.inputs(table, indices) for indices in batches)
        inputs = [self.inputs(table, indices) for indices in batches]
        return [iter(inputs) for _ in range(chunks)]

    @property
    def schedule_seq_length(self) -> int:
        """The length of one micro-batch's sequence as the pipeline schedule sends it between
        stages: s for [b, s] rows, or b * s (rounded up for sequence parallelism) packed."""
        if not self.packed:
            return self.seq_length
        total = self.micro_batch_size * self.seq_length
        multiple = self.tensor_parallel if self.tensor_parallel > 1 else 1
        return -(-total // multiple) * multiple

    @property
    def schedule_micro_batch_size(self) -> int:
        """Rows per micro-batch as the schedule sees them: packed, all rows are one."""
        return 1 if self.packed else self.micro_batch_size

    def val_batches(self, limit: int = 0) -> list[np.ndarray]:
        """This rank's micro-batches of the val split, at most `limit` (0: all of it): round r
        covers rows [r * m * d, (r + 1) * m * d) for m rows per micro-batch and d data-parallel
        ranks; the last may be short (collate fills it with padding)."""
        data_size = self.sampler.data_parallel_size
        data_rank = self.sampler.data_parallel_rank
        per_round = self.micro_batch_size * data_size
        rounds = -(-self.val_rows // per_round)
        if limit:
            rounds = min(rounds, limit)
        batches = []
        for index in range(rounds):
            start = index * per_round + data_rank * self.micro_batch_size
            batches.append(np.arange(start, min(start + self.micro_batch_size, self.val_rows)))
        return batches


def setup_data(plan: RunPlan, parallel: Parallel) -> RunData:
    """Open the splits and the sampler of this data-parallel rank.

    Args:
        plan: the checked run (data directory, rows, sequence length, batch sizes, seed, and
            the attention's layout: packed thd or rows with a mask).
        parallel: this rank's place in the process grid and its device.

    Returns:
        The rank's RunData.
    """
    config = plan.config
    return RunData(
        sampler=StepSampler(
            rows=plan.train_rows,
            global_batch_size=config.global_batch_size,
            micro_batch_size=config.micro_batch_size,
            data_parallel_size=parallel.data_size,
            data_parallel_rank=parallel.data_rank,
            seed=config.seed,
        ),
        train=open_split(config.data, "train"),
        val=open_split(config.data, "val") if plan.val_rows else None,
        val_rows=plan.val_rows,
        seq_length=plan.seq_length,
        micro_batch_size=config.micro_batch_size,
        packed=plan.attention.packed,
        device=parallel.device,
        context_parallel=config.context_parallel,
        context_rank=parallel.context_rank,
        tensor_parallel=config.tensor_parallel,
        sequence_parallel=uses_sequence_parallel(config, parallel, plan.architecture),
    )
