"""Best-fit-decreasing packing of examples into rows of at most `capacity` tokens.

Over the whole split at once, not over chunks: packing quality comes from having many short
examples available to fill the gaps the long ones leave. Only the lengths are held in memory
(the "packing index"), so memory grows with the number of examples, not with their tokens.

Best fit: each example, longest first, goes into the open row whose free space is the
smallest that still fits it. Rows are found by free space through a sorted list of
free-space values, so each placement costs a bisect.
"""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np


class _FreeSpaceIndex:
    """Open rows grouped by free space, answering "the smallest free space >= n".

    The distinct free-space values are kept in a sorted list: there are at most capacity + 1 of
    them, so a bisect plus a C-level insert or delete is cheaper than any tree in Python.
    """

    def __init__(self) -> None:
        self.free_values: list[int] = []
        self.rows: dict[int, list[int]] = {}

    def add(self, free: int, row: int) -> None:
        rows = self.rows.get(free)
        if rows:
            rows.append(row)
        else:
            insort(self.free_values, free)
            self.rows[free] = [row]

    def pop_smallest_at_least(self, need: int) -> tuple[int, int] | None:
        """Removes and returns (free space, row) of the tightest row with room for `need`."""
        at = bisect_left(self.free_values, need)
        if at == len(self.free_values):
            return None
        free = self.free_values[at]
        rows = self.rows[free]
        row = rows.pop()
        if not rows:
            del self.free_values[at]
            del self.rows[free]
        return free, row


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
    index = _FreeSpaceIndex()
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
