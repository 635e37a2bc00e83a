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


def _normal_interval(values: list[float], z: float) -> tuple[float, float]:
    """The mean of ``values`` and the half-width of its normal-approximation interval."""
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
    return mean, z * math.sqrt(variance / len(values))


def mean_interval(values: list[float], z: float = 1.959964) -> Accuracy:
    """The mean of per-sample scores in [0, 1] with a normal-approximation interval, clipped to
    [0, 1] (per-sample fractions are bounded, so the mean's distribution is close to normal)."""
    if not values:
        return Accuracy(0, 0, 0.0, 1.0)
    mean, half = _normal_interval(values, z)
    return Accuracy(sum(values), len(values), max(0.0, mean - half), min(1.0, mean + half))


@dataclass(frozen=True)
class Difference:
    """A paired difference of accuracies: the mean per-sample difference and its 95 % interval."""

    mean: float
    low: float
    high: float
    total: int

    def __str__(self) -> str:
        return f"{100 * self.mean:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"


def paired_difference(differences: list[float], z: float = 1.959964) -> Difference:
    """The mean of per-sample differences of two defences' scores (each in [0, 1]) on the same
    samples, with a normal interval (the paired test: what varies between images cancels, so it
    is far narrower than two separate intervals). Where the differences do not scatter (all
    equal, e.g. both defences wrong everywhere), the normal interval would have no width: the
    half-width is then at least the range 2 times Wilson's bound z²/(n + z²) on the share of
    samples that could still differ. One sample or none says nothing: [-1, 1]."""
    total = len(differences)
    if total < 2:
        return Difference(differences[0] if differences else float("nan"), -1.0, 1.0, total)
    mean, half = _normal_interval(differences, z)
    if half == 0.0:
        half = 2 * z * z / (total + z * z)
    return Difference(mean, max(-1.0, mean - half), min(1.0, mean + half), total)
