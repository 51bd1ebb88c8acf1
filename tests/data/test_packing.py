from __future__ import annotations

import numpy as np
import pytest

from megasft.data.packing import (
    pack_best_fit_decreasing,
    pack_best_fit_in_chunks,
    packing_efficiency,
)


def _check_invariants(lengths, rows, capacity):
    members = sorted(index for row in rows for index in row)
    assert members == list(range(len(lengths))), "every example exactly once"
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)


def test_best_fit_decreasing_places_every_example_once_within_capacity():
    lengths = np.random.default_rng(0).integers(1, 500, size=3000)
    rows = pack_best_fit_decreasing(lengths, 1024, seed=3)
    _check_invariants(lengths, rows, 1024)
    assert packing_efficiency(lengths, rows, 1024) > 0.99


def test_packing_is_deterministic_for_a_seed_and_changes_with_it():
    lengths = np.random.default_rng(1).integers(1, 300, size=500)
    assert pack_best_fit_decreasing(lengths, 512, seed=7) == pack_best_fit_decreasing(
        lengths, 512, seed=7
    )
    assert pack_best_fit_decreasing(lengths, 512, seed=7) != pack_best_fit_decreasing(
        lengths, 512, seed=8
    )


def test_best_fit_chooses_the_tightest_row():
    # Rows left with free space 3 and 6 after the first two items; a 3 goes to the tighter one.
    rows = pack_best_fit_decreasing(np.array([7, 4, 3]), 10, seed=0)
    assert sorted(sorted(row) for row in rows) == [[0, 2], [1]]


def test_whole_dataset_beats_chunks():
    rng = np.random.default_rng(2)
    lengths = np.concatenate([rng.integers(600, 1000, 2000), rng.integers(10, 60, 2000)])
    whole = packing_efficiency(lengths, pack_best_fit_decreasing(lengths, 1024), 1024)
    chunked = packing_efficiency(lengths, pack_best_fit_in_chunks(lengths, 1024, 1000), 1024)
    assert whole > chunked


def test_exact_fits_and_edge_lengths():
    rows = pack_best_fit_decreasing(np.array([10, 10, 1, 9]), 10)
    _check_invariants([10, 10, 1, 9], rows, 10)
    assert len(rows) == 3
    assert pack_best_fit_decreasing(np.array([], dtype=np.int64), 10) == []
    with pytest.raises(ValueError):
        pack_best_fit_decreasing(np.array([11]), 10)
