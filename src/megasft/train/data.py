"""Training data: which rows each rank sees at each step, and how a micro-batch is built.

The order is a pure function of (seed, step): the sample stream is the concatenation of one
seeded permutation of the train rows per epoch, and optimizer step `s` consumes stream items
[s * G, (s + 1) * G) for a global batch of G rows. Each data-parallel rank takes its
contiguous share of those G rows and splits it into micro-batches. Nothing else is state, so
resuming at step `s` continues exactly where the interrupted run was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from megasft.train.batch import block_causal_mask, packed_position_ids


class StepSampler:
    """Row indices of the train split for each step, data-parallel rank and micro-batch."""

    def __init__(
        self,
        rows: int,
        global_batch_size: int,
        micro_batch_size: int,
        data_parallel_size: int,
        data_parallel_rank: int,
        seed: int,
    ):
        if rows < 1:
            raise ValueError("the train split is empty")
        self.rows = rows
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.data_parallel_size = data_parallel_size
        self.data_parallel_rank = data_parallel_rank
        self.seed = seed
        self._epoch_cache: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._epoch_cache:
            # Only the epochs a step touches are kept: at most two at a time.
            if len(self._epoch_cache) > 2:
                self._epoch_cache.pop(min(self._epoch_cache))
            generator = np.random.default_rng([self.seed, epoch])
            self._epoch_cache[epoch] = generator.permutation(self.rows)
        return self._epoch_cache[epoch]

    def global_batch(self, step: int) -> np.ndarray:
        """All G row indices of optimizer step `step` (0-based), in stream order."""
        start = step * self.global_batch_size
        positions = np.arange(start, start + self.global_batch_size)
        epochs, offsets = np.divmod(positions, self.rows)
        return np.array(
            [self._permutation(int(e))[int(o)] for e, o in zip(epochs, offsets, strict=True)]
        )

    def micro_batches(self, step: int) -> list[np.ndarray]:
        """This rank's micro-batches of step `step`: its contiguous share of the global batch."""
        share = self.global_batch_size // self.data_parallel_size
        mine = self.global_batch(step)[
            self.data_parallel_rank * share : (self.data_parallel_rank + 1) * share
        ]
        return [mine[i : i + self.micro_batch_size] for i in range(0, share, self.micro_batch_size)]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch_size / self.rows


def steps_for_epochs(epochs: float, rows: int, global_batch_size: int) -> int:
    return max(1, math.ceil(epochs * rows / global_batch_size))


@dataclass(frozen=True)
class MicroBatch:
    tokens: torch.Tensor
    """[b, s] int64 input ids, padded with `pad_id`."""
    loss_mask: torch.Tensor
    """[b, s] float32, unshifted: loss_mask[b, i] == 1 iff tokens[b, i] is a target."""
    position_ids: torch.Tensor
    """[b, s] int64, restarting at 0 at every packed document."""
    attention_mask: torch.Tensor | None
    """[b, 1, s, s] bool, True = masked out (megatron-core's convention): causal within each
    document, nothing across documents. None when not asked for."""
    seq_lengths: list[list[int]]
    """Per row, the document lengths (without the padding tail)."""

    @property
    def target_tokens(self) -> int:
        return int(self.loss_mask[:, 1:].sum())


def collate(
    table: pa.Table,
    indices: np.ndarray,
    seq_length: int,
    pad_id: int,
    rows: int | None = None,
    attention_mask: bool = True,
) -> MicroBatch:
    """Builds a micro-batch from rows of a prepared split, padded to `seq_length`.

    Padding is never a target (its mask is 0), and forms its own attention block so that no
    real token attends to it. With `rows` above `len(indices)`, the batch is filled up with
    rows of padding only (no targets): the last validation batches, whose shape the pipeline
    schedule fixes. `attention_mask=False` leaves the [b, 1, s, s] mask out (the packed
    Transformer Engine path isolates documents by their lengths instead).
    """
    examples = table.take(pa.array(indices, type=pa.int64())).to_pylist()
    batch = max(len(examples), rows or 0)
    tokens = torch.full((batch, seq_length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((batch, seq_length), dtype=torch.float32)
    seq_lengths = []
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        if length > seq_length:
            raise ValueError(f"row of {length} tokens is longer than seq_length {seq_length}")
        tokens[row, :length] = torch.tensor(example["input_ids"], dtype=torch.long)
        loss_mask[row, :length] = torch.tensor(example["loss_mask"], dtype=torch.float32)
        seq_lengths.append([int(n) for n in example["seq_lengths"]])
    seq_lengths += [[] for _ in range(batch - len(examples))]
    return MicroBatch(
        tokens=tokens,
        loss_mask=loss_mask,
        position_ids=packed_position_ids(seq_lengths, seq_length),
        attention_mask=block_causal_mask(seq_lengths, seq_length) if attention_mask else None,
        seq_lengths=seq_lengths,
    )
