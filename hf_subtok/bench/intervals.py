"""Confidence intervals for the accuracies the benchmark reports."""

from __future__ import annotations

import math


def wilson(score_sum: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion `score_sum / n` (partial credit counts as a
    fraction of a success, as RULER's mean score does)."""
    if n <= 0:
        raise ValueError(f"n={n!r} must be > 0")
    p = score_sum / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def compare(score_a: float, n_a: int, score_b: float, n_b: int) -> str:
    """Whether the 95% Wilson intervals of `a` and `b` separate: 'above' (a's lower bound over b's
    upper), 'below', or 'overlap' (the data do not rank them)."""
    low_a, high_a = wilson(score_a, n_a)
    low_b, high_b = wilson(score_b, n_b)
    if low_a > high_b:
        return "above"
    if high_a < low_b:
        return "below"
    return "overlap"
