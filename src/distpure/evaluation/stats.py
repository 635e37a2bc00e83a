"""Accuracy with 95 % intervals: Wilson score intervals for proportions, a normal interval for a
mean of per-sample fractions (expected accuracy over several scoring draws)."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Accuracy:
    """``correct`` is the number of samples right, or the sum of per-sample fractions."""

    correct: float
    total: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def __str__(self) -> str:
        return f"{100 * self.value:.1f} [{100 * self.low:.1f}, {100 * self.high:.1f}]"


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % by default)."""
    if total == 0:
        return (0.0, 1.0)
    if correct in (0, total):  # closed forms; avoids round-off just inside the bound
        bound = z * z / (total + z * z)
        return (0.0, bound) if correct == 0 else (1.0 - bound, 1.0)
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy(correct: int, total: int) -> Accuracy:
    return Accuracy(correct, total, *wilson_interval(correct, total))


def mean_interval(values: list[float], z: float = 1.959964) -> Accuracy:
    """The mean of per-sample scores in [0, 1] with a normal-approximation interval, clipped to
    [0, 1] (per-sample fractions are bounded, so the mean's distribution is close to normal)."""
    total = len(values)
    if total == 0:
        return Accuracy(0, 0, 0.0, 1.0)
    mean = sum(values) / total
    variance = sum((v - mean) ** 2 for v in values) / max(1, total - 1)
    half = z * math.sqrt(variance / total)
    return Accuracy(sum(values), total, max(0.0, mean - half), min(1.0, mean + half))
