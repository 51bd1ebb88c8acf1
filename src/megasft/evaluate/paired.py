"""Paired statistics of two models answering the same prompts: is the difference more than noise?

Each prompt gives a pair of verdicts (tuned right or wrong, base right or wrong). The accuracy
difference gets a 95% confidence interval by Newcombe's hybrid score method for paired
proportions (Newcombe 1998, "method 10": Wilson score intervals of the two accuracies, combined
with the correlation of the pairs), and the exact McNemar test gives a two-sided p-value from
the prompts only one model got right. Why these two, and the formulas: docs/evaluate.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
Z_95 = 1.959963984540054
"""The standard normal quantile at 0.975: a two-sided 95% interval."""
METHOD = "newcombe-hybrid-score-paired (method 10), exact mcnemar"
PAIRED_METRICS = ("delta_accuracy_ci_low", "delta_accuracy_ci_high", "mcnemar_p")
"""The paired statistics the gate may name (they need a baseline and generation)."""


@dataclass(frozen=True)
class PairedCounts:
    both_correct: int
    only_tuned_correct: int
    only_base_correct: int
    both_wrong: int

    @property
    def total(self) -> int:
        return (
            self.both_correct + self.only_tuned_correct + self.only_base_correct + self.both_wrong
        )


def paired_counts(tuned: Sequence[bool], base: Sequence[bool]) -> PairedCounts:
    """The 2x2 table of verdicts.

    Args:
        tuned, base: per prompt, in the same order, whether each model's answer is correct.

    Returns:
        How many prompts both, only one, or neither model got right.

    Raises:
        ValueError: when the two lists differ in length or are empty.
    """
    if len(tuned) != len(base):
        raise ValueError(f"{len(tuned)} tuned verdicts but {len(base)} base verdicts")
    if not tuned:
        raise ValueError("no verdicts to compare")
    pairs = list(zip(tuned, base, strict=True))
    return PairedCounts(
        both_correct=sum(t and b for t, b in pairs),
        only_tuned_correct=sum(t and not b for t, b in pairs),
        only_base_correct=sum(b and not t for t, b in pairs),
        both_wrong=sum(not t and not b for t, b in pairs),
    )


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion.

    Args:
        successes, total: the proportion is successes / total (total > 0).
        z: the normal quantile (1.96 for 95%).

    Returns:
        (low, high), within [0, 1].
    """
    p = successes / total
    centre = p + z * z / (2 * total)
    spread = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    denominator = 1 + z * z / total
    return max(0.0, (centre - spread) / denominator), min(1.0, (centre + spread) / denominator)


def newcombe_paired_interval(counts: PairedCounts, z: float = Z_95) -> tuple[float, float]:
    """Newcombe's hybrid score interval (method 10) for tuned minus base accuracy, paired.

    With a, b, c, d = both, only tuned, only base, neither correct and n their sum:
    p1 = (a+b)/n and p2 = (a+c)/n have Wilson intervals (l1, u1) and (l2, u2);
    phi = (ad - bc) / sqrt((a+b)(c+d)(a+c)(b+d)), 0 when a margin is empty;
    low = p1 - p2 - sqrt((p1-l1)^2 - 2 phi (p1-l1)(u2-p2) + (u2-p2)^2),
    high = p1 - p2 + sqrt((u1-p1)^2 - 2 phi (u1-p1)(p2-l2) + (p2-l2)^2).

    Args:
        counts: the 2x2 table of verdicts.
        z: the normal quantile (1.96 for 95%).

    Returns:
        (low, high), within [-1, 1].
    """
    a, b, c, d = (
        counts.both_correct,
        counts.only_tuned_correct,
        counts.only_base_correct,
        counts.both_wrong,
    )
    n = counts.total
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, z)
    l2, u2 = wilson_interval(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(margins) if margins else 0.0
    # Each square root is at least |x - y| >= 0 because |phi| <= 1; max() guards rounding.
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, p1 - p2 - below), min(1.0, p1 - p2 + above)


def mcnemar_exact_p(only_tuned_correct: int, only_base_correct: int) -> float:
    """The exact two-sided McNemar test: are the prompts only one model got right split evenly?

    Under the null hypothesis each discordant prompt is the tuned model's with probability 1/2,
    so the smaller count is binomial(b + c, 1/2); the p-value doubles its lower tail.

    Args:
        only_tuned_correct, only_base_correct: the discordant counts b and c.

    Returns:
        min(1, 2 * P(X <= min(b, c))), 1 when there are no discordant prompts.
    """
    discordant = only_tuned_correct + only_base_correct
    smaller = min(only_tuned_correct, only_base_correct)
    tail = sum(math.comb(discordant, k) for k in range(smaller + 1)) / 2**discordant
    return min(1.0, 2 * tail)


def paired_statistics(tuned: Sequence[bool], base: Sequence[bool]) -> dict:
    """The paired comparison of two models' verdicts on the same prompts.

    Args:
        tuned, base: per prompt, in the same order, whether each model's answer is correct.

    Returns:
        `method`, `confidence`, the 2x2 counts, `delta_accuracy_ci_low`,
        `delta_accuracy_ci_high` and `mcnemar_p`: metrics.json's `paired`.

    Raises:
        ValueError: when the two lists differ in length or are empty.
    """
    counts = paired_counts(tuned, base)
    low, high = newcombe_paired_interval(counts)
    return {
        "method": METHOD,
        "confidence": CONFIDENCE,
        "samples": counts.total,
        "both_correct": counts.both_correct,
        "only_tuned_correct": counts.only_tuned_correct,
        "only_base_correct": counts.only_base_correct,
        "both_wrong": counts.both_wrong,
        "delta_accuracy_ci_low": low,
        "delta_accuracy_ci_high": high,
        "mcnemar_p": mcnemar_exact_p(counts.only_tuned_correct, counts.only_base_correct),
    }
