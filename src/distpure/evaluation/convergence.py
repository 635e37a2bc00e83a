"""Has an attack converged? Its accuracy on the attacker's own draws per iteration, pooled over
the batches of a run, and a flag for an attack still gaining at its end: accuracy falling by
more than ``TOLERANCE`` over the last quarter of its iterations means more iterations (or EOT)
would likely break more samples, so its robust accuracy is an upper bound."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

TOLERANCE = 0.01  # one point of accuracy


@dataclass(frozen=True)
class Curve:
    """One attack's pooled trace on one defence (``owner``; ``victim=<name>`` for transfer)."""

    owner: str
    attack: str
    steps: list[int]
    accuracy: list[float]
    loss: list[float]
    samples: int

    @property
    def late_drop(self) -> float:
        """How much accuracy fell over the last quarter of the iterations: the least-squares
        line through its points, from its first to its last iteration (less at the mercy of
        one noisy iteration than the difference of two points)."""
        return self._late_line[0]

    @property
    def late_drop_error(self) -> float:
        """The standard error of ``late_drop`` from the scatter about the line (the noise of
        the attacker's own draws): a fall within about two of it may be noise alone."""
        return self._late_line[1]

    @cached_property  # read by both properties above, per report row
    def _late_line(self) -> tuple[float, float]:
        first = (3 * (len(self.accuracy) - 1)) // 4
        xs, ys = self.steps[first:], self.accuracy[first:]
        if len(xs) < 2:
            return 0.0, 0.0
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        spread = sum((x - mean_x) ** 2 for x in xs)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread
        residual = sum((y - mean_y - slope * (x - mean_x)) ** 2 for x, y in zip(xs, ys))
        error = math.sqrt(residual / (len(xs) - 2) / spread) if len(xs) > 2 else 0.0
        return -slope * (xs[-1] - xs[0]), error * (xs[-1] - xs[0])

    @property
    def converged(self) -> bool:
        return self.late_drop <= TOLERANCE


def curves(traces: list[dict]) -> list[Curve]:
    """Per (owner, attack), the sample-weighted mean of its batches' traces (batches of one
    attack share its iterations)."""
    pooled: dict[tuple[str, str], list[dict]] = {}
    for trace in traces:
        pooled.setdefault((trace["owner"], trace["attack"]), []).append(trace)
    result = []
    for (owner, attack), batches in pooled.items():
        samples = sum(b["n"] for b in batches)
        steps = [point["step"] for point in batches[0]["trace"]]
        mean = lambda key, i: sum(b["n"] * b["trace"][i][key] for b in batches) / samples  # noqa: E731
        result.append(Curve(owner, attack, steps, [mean("accuracy", i) for i in range(len(steps))],
                            [mean("loss", i) for i in range(len(steps))], samples))
    return result


def convergence_summary(traces: list[dict]) -> dict[str, dict]:
    """``{"<owner>/<attack>": {converged, late_drop, late_drop_error, final_accuracy, steps,
    samples}}``."""
    return {f"{c.owner}/{c.attack}": {"converged": c.converged, "late_drop": c.late_drop,
                                      "late_drop_error": c.late_drop_error,
                                      "final_accuracy": c.accuracy[-1], "steps": c.steps[-1],
                                      "samples": c.samples} for c in curves(traces)}
