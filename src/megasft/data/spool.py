"""Phases 2 and 3 of `prepare`: spool each split's examples to disk, then write them packed.

The spool keeps two flat files per split (token ids, loss mask) and only the examples' lengths
in memory; packing reads the examples back a write batch at a time, so that memory does not
grow with the dataset or `--seq-length`.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa

from megasft.data.masking import MaskedBatch
from megasft.data.packing import pack_best_fit_decreasing
from megasft.data.store import EXAMPLE_SCHEMA, SplitWriter, flat_example_batch, list_array

WRITE_BATCH_TOKENS = 1 << 20
"""About this many tokens per Arrow record batch written (whole rows)."""


class SplitSpool:
    """Unpacked examples of one split, end to end in two flat files (token ids, loss mask),
    their lengths in memory. Packing reads them back a write batch at a time."""

    def __init__(self, directory: Path, split: str):
        self.ids_path = directory / f".spool-{split}.ids"
        self.mask_path = directory / f".spool-{split}.mask"
        # Open for the whole collect phase; `close` closes them.
        self._ids = open(self.ids_path, "wb")  # noqa: SIM115
        self._masks = open(self.mask_path, "wb")  # noqa: SIM115
        self._lengths: list[np.ndarray] = []
        self.examples = 0
        self.loss_tokens = 0

    def add(self, batch: MaskedBatch, indices: list[int]) -> None:
        """Appends the examples `indices` (increasing) of `batch`."""
        if not indices:
            return
        lengths = np.diff(batch.offsets)
        if len(indices) == len(lengths):
            ids, masks = batch.input_ids, batch.loss_mask
        else:
            keep = np.zeros(len(lengths), dtype=bool)
            keep[indices] = True
            tokens = np.repeat(keep, lengths)
            ids, masks, lengths = batch.input_ids[tokens], batch.loss_mask[tokens], lengths[keep]
        self._ids.write(np.ascontiguousarray(ids, dtype=np.int32).data)
        self._masks.write(np.ascontiguousarray(masks, dtype=np.int8).data)
        self._lengths.append(lengths)
        self.examples += len(lengths)
        self.loss_tokens += int(np.count_nonzero(masks))

    def close(self) -> None:
        self._ids.close()
        self._masks.close()

    def lengths(self) -> np.ndarray:
        """[examples] int64, in the order they were added."""
        return np.concatenate([np.zeros(0, np.int64), *self._lengths])

    def gather(self, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, loss_mask) of the examples at token positions `starts` with `lengths`,
        end to end in that order.

        Read with one read per example, not through a memory map: the members of a packed
        batch come from all over the spool, and every page a map touches counts in the
        process's memory until it is unmapped, which made peak memory grow with the dataset.
        """
        total = int(lengths.sum())
        ids, masks = np.empty(total, np.int32), np.empty(total, np.int8)
        for path, out in ((self.ids_path, ids), (self.mask_path, masks)):
            size = out.itemsize
            view = memoryview(out).cast("B")
            with open(path, "rb", buffering=0) as spool:
                at = 0
                for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
                    spool.seek(start * size)
                    spool.readinto(view[at : at + length * size])
                    at += length * size
        return ids, masks

    def remove(self) -> None:
        self.ids_path.unlink()
        self.mask_path.unlink()


def _write_batches(row_tokens: np.ndarray) -> Iterator[slice]:
    """Consecutive rows in groups of about WRITE_BATCH_TOKENS tokens (at least one row each),
    so that the memory a write batch takes does not grow with --seq-length or the dataset."""
    ends = np.cumsum(row_tokens)
    start = 0
    while start < len(row_tokens):
        done = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, done + WRITE_BATCH_TOKENS, "right")))
        yield slice(start, stop)
        start = stop


def write_unpacked(spool: SplitSpool, out: Path) -> int:
    """Writes the spooled examples to `out` as they are, one per row.

    Args:
        spool: the split's examples, closed for writing.
        out: the Arrow file to write.

    Returns:
        The number of rows written (the examples).
    """
    lengths = spool.lengths()
    starts = np.cumsum(lengths) - lengths
    writer = SplitWriter(out)
    for rows in _write_batches(lengths):
        ids, masks = spool.gather(
            starts[rows.start : rows.start + 1], lengths[rows].sum(keepdims=True)
        )
        writer.write(flat_example_batch(ids, masks, lengths[rows]))
    writer.close()
    return len(lengths)


def write_packed(spool: SplitSpool, seq_length: int, seed: int, out: Path) -> int:
    """Packs the spooled examples into rows of at most `seq_length` tokens and writes them.

    Args:
        spool: the split's examples, closed for writing.
        seq_length: the most tokens a row holds.
        seed: seeds the packing order (`packing.pack_best_fit_decreasing`).
        out: the Arrow file to write.

    Returns:
        The number of packed rows written.
    """
    lengths = spool.lengths()
    example_starts = np.cumsum(lengths) - lengths
    rows = pack_best_fit_decreasing(lengths, seq_length, seed=seed)
    # The members of every row in order, rows end to end, and where each row's members begin.
    members = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    member_bounds = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(members, out=member_bounds[1:])
    order = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=int(member_bounds[-1]))
    member_lengths = lengths[order]
    row_tokens = np.add.reduceat(member_lengths, member_bounds[:-1]) if rows else members
    writer = SplitWriter(out)
    for batch_rows in _write_batches(row_tokens):
        chosen = slice(member_bounds[batch_rows.start], member_bounds[batch_rows.stop])
        # Their tokens end to end are exactly the concatenation of the batch's packed rows.
        ids, masks = spool.gather(example_starts[order[chosen]], member_lengths[chosen])
        batch = pa.RecordBatch.from_arrays(
            [
                list_array(row_tokens[batch_rows], ids, pa.int32()),
                list_array(row_tokens[batch_rows], masks, pa.int8()),
                list_array(members[batch_rows], member_lengths[chosen], pa.int32()),
            ],
            schema=EXAMPLE_SCHEMA,
        )
        writer.write(batch)
    writer.close()
    return len(rows)
