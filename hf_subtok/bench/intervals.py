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
