"""Paired statistics against values worked out by hand from the formulas in docs/evaluate.md."""

from __future__ import annotations

import pytest

from megasft.evaluate.paired import (
    PairedCounts,
    mcnemar_exact_p,
    newcombe_paired_interval,
    paired_counts,
    paired_statistics,
    wilson_interval,
)


def verdicts(both: int, only_tuned: int, only_base: int, neither: int):
    tuned = [True] * both + [True] * only_tuned + [False] * only_base + [False] * neither
    base = [True] * both + [False] * only_tuned + [True] * only_base + [False] * neither
    return tuned, base


def test_the_table_counts_each_kind_of_pair():
    tuned, base = verdicts(3, 2, 1, 4)
    assert paired_counts(tuned, base) == PairedCounts(3, 2, 1, 4)


def test_wilson_interval_of_2_in_21():
    # p = 0.095238, z^2 = 3.841459: centre = (p + z^2/42) / (1 + z^2/21) = 0.157898,
    # half-width = z sqrt(p(1-p)/21 + z^2/1764) / (1 + z^2/21) = 0.131311.
    low, high = wilson_interval(2, 21)
    assert low == pytest.approx(0.026519, abs=1e-6)
    assert high == pytest.approx(0.289141, abs=1e-6)


def test_newcombe_interval_of_a_table_where_the_base_model_wins():
    # a, b, c, d = 1, 1, 7, 12 (n = 21): p1 = 2/21 = 0.095238, p2 = 8/21 = 0.380952.
    # Wilson: (l1, u1) = (0.026519, 0.289141), (l2, u2) = (0.207510, 0.591213).
    # phi = (1*12 - 1*7) / sqrt(2*19*8*13) = 5 / 62.865 = 0.079536.
    # low  = -0.285714 - sqrt(0.068719^2 - 2 phi 0.068719*0.210261 + 0.210261^2) = -0.501663
    # high = -0.285714 + sqrt(0.193903^2 - 2 phi 0.193903*0.173442 + 0.173442^2) = -0.036053
    low, high = newcombe_paired_interval(PairedCounts(1, 1, 7, 12))
    assert low == pytest.approx(-0.501663, abs=1e-6)
    assert high == pytest.approx(-0.036053, abs=1e-6)


def test_newcombe_interval_of_a_table_where_the_tuned_model_wins():
    # a, b, c, d = 12, 9, 2, 21 (n = 44): p1 = 21/44, p2 = 14/44, phi = 0.519538.
    low, high = newcombe_paired_interval(PairedCounts(12, 9, 2, 21))
    assert low == pytest.approx(0.018210, abs=1e-6)
    assert high == pytest.approx(0.289157, abs=1e-6)


def test_without_discordant_prompts_the_interval_never_excludes_zero():
    # 5 both right, 5 both wrong: phi = 1, so each half-width is |(p - l) - (u - p)|, and at
    # p = 1/2 the Wilson arms are equal: the interval is the difference itself, 0.
    low, high = newcombe_paired_interval(PairedCounts(5, 0, 0, 5))
    assert low == pytest.approx(0.0, abs=1e-12)
    assert high == pytest.approx(0.0, abs=1e-12)
    # All right: a margin is empty, so phi is taken as 0; both Wilson intervals of 10/10 are
    # (0.722467, 1), so low = -sqrt((1 - 0.722467)^2 + 0^2) and high = +sqrt(0^2 + 0.277533^2).
    low, high = newcombe_paired_interval(PairedCounts(10, 0, 0, 0))
    assert low == pytest.approx(-0.277533, abs=1e-6)
    assert high == pytest.approx(0.277533, abs=1e-6)


def test_mcnemar_exact_p_doubles_the_smaller_binomial_tail():
    # b = 1, c = 7: 2 * (C(8,0) + C(8,1)) / 2^8 = 18/256.
    assert mcnemar_exact_p(1, 7) == pytest.approx(18 / 256)
    assert mcnemar_exact_p(7, 1) == pytest.approx(18 / 256)
    # b = 9, c = 2: 2 * (1 + 11 + 55) / 2^11 = 134/2048.
    assert mcnemar_exact_p(9, 2) == pytest.approx(134 / 2048)
    assert mcnemar_exact_p(4, 4) == 1.0
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(188, 0) == pytest.approx(2 / 2**188)


def test_paired_statistics_for_the_demo_shape():
    # 0.95 vs 0.01 on 200 prompts: 2 both right, 188 only tuned, 0 only base, 10 neither.
    statistics = paired_statistics(*verdicts(2, 188, 0, 10))
    assert statistics["samples"] == 200
    assert statistics["only_tuned_correct"] == 188
    assert statistics["delta_accuracy_ci_low"] == pytest.approx(0.893298, abs=1e-6)
    assert statistics["delta_accuracy_ci_high"] == pytest.approx(0.963592, abs=1e-6)
    assert statistics["mcnemar_p"] < 1e-50
    assert statistics["confidence"] == 0.95


def test_paired_statistics_refuses_unpaired_verdicts():
    with pytest.raises(ValueError, match="3 tuned verdicts but 2 base"):
        paired_statistics([True, False, True], [True, False])
    with pytest.raises(ValueError, match="no verdicts"):
        paired_statistics([], [])
