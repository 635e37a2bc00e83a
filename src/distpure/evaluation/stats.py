"""Accuracy with 95 % Wilson score intervals."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Accuracy:
    correct: int
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
