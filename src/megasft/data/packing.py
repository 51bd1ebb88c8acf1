"""Best-fit-decreasing packing of examples into rows of at most `capacity` tokens.

Over the whole split at once, not over chunks: packing quality comes from having many short
examples available to fill the gaps the long ones leave. Only the lengths are held in memory
(the "packing index"), so memory grows with the number of examples, not with their tokens.

Best fit: each example, longest first, goes into the open row whose free space is the
smallest that still fits it. Rows are found by free space through a segment tree over
free-space values 0..capacity, so each placement is O(log capacity).
"""

from __future__ import annotations

import numpy as np


class _FreeSpaceIndex:
    """Counts of open rows per free-space value, answering "smallest free space >= n"."""

    def __init__(self, capacity: int):
        self.size = 1
        while self.size < capacity + 1:
            self.size *= 2
        self.counts = [0] * (2 * self.size)  # plain list: faster than numpy for scalar updates
        self.rows: list[list[int]] = [[] for _ in range(capacity + 1)]

    def add(self, free: int, row: int) -> None:
        self.rows[free].append(row)
        node = free + self.size
        while node:
            self.counts[node] += 1
            node //= 2

    def pop_smallest_at_least(self, need: int) -> tuple[int, int] | None:
        """Removes and returns (free space, row) of the tightest row with room for `need`."""
        free = self._first_nonempty_at_or_after(need)
        if free is None:
            return None
        row = self.rows[free].pop()
        node = free + self.size
        while node:
            self.counts[node] -= 1
            node //= 2
        return free, row

    def _first_nonempty_at_or_after(self, low: int) -> int | None:
        # Walk up from the leaf `low` to find a right sibling subtree with rows, then down.
        node = low + self.size
        if self.counts[node]:
            return low
        while node > 1:
            if node % 2 == 0 and self.counts[node + 1]:
                node += 1
                break
            node //= 2
        else:
            return None
        while node < self.size:
            node = 2 * node if self.counts[2 * node] else 2 * node + 1
        return node - self.size


def pack_best_fit_decreasing(lengths: np.ndarray, capacity: int, seed: int = 0) -> list[list[int]]:
    """Groups example indices into rows whose total length is at most `capacity`.

    Deterministic for a seed: examples of equal length are ordered by a seeded permutation
    (so ties do not depend on input order alone), and the rows come back in a seeded shuffled
    order (so the file is not sorted by length). Every index appears in exactly one row.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"every length must be in 1..{capacity}")
    rng = np.random.default_rng(seed)
    tie_break = rng.permutation(len(lengths))
    order = np.lexsort((tie_break, -lengths))  # longest first, ties by the seeded permutation

    rows: list[list[int]] = []
    index = _FreeSpaceIndex(capacity)
    for example in order.tolist():
        length = int(lengths[example])
        found = index.pop_smallest_at_least(length)
        if found is None:
            free, row = capacity, len(rows)
            rows.append([])
        else:
            free, row = found
        rows[row].append(example)
        if free - length > 0:
            index.add(free - length, row)
    shuffled = rng.permutation(len(rows))
    return [rows[i] for i in shuffled.tolist()]


def pack_best_fit_in_chunks(
    lengths: np.ndarray, capacity: int, chunk: int = 1000
) -> list[list[int]]:
    """Best-fit-decreasing within consecutive chunks of `chunk` examples, as many tools do.

    Kept only as the comparison point in bench/prepare.py.
    """
    rows: list[list[int]] = []
    for start in range(0, len(lengths), chunk):
        part = pack_best_fit_decreasing(lengths[start : start + chunk], capacity)
        rows.extend([[start + i for i in row] for row in part])
    return rows


def packing_efficiency(lengths: np.ndarray, rows: list[list[int]], capacity: int) -> float:
    """Real tokens / (rows * capacity)."""
    if not rows:
        return 0.0
    return float(np.asarray(lengths).sum()) / (len(rows) * capacity)
