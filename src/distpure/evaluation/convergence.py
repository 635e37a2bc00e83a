"""Has an attack converged? Three measures, strongest evidence first:

- a **continuation** (a later attack of the same kind and threat that starts from this one's
  examples): how much the scored accuracy fell from this attack's examples to the
  continuation's, paired over the samples the continuation attacked;
- the **scored fall over the last quarter**: the scoring draws classify both the final examples
  and what the attack had kept at the start of its last quarter; the paired fall between them;
- the **trace**: accuracy on the attacker's own draws per iteration, pooled over the batches.

A fall of more than ``TOLERANCE`` means more iterations (or EOT) would likely break more
samples, so the attack's robust accuracy is an upper bound. The scored measures judge the
examples the attack returns (its kept iterates, judged by fresh draws); the trace judges its
current iterate on its own few draws, which is noisier and blind to what keeping the best
iterate gains.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from ..attacks.pgd import late_iteration
from ..attacks.suite import AttackConfig
from .config import ExperimentConfig
from .protocol import outcome, threat_group
from .stats import Difference, paired_difference

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
        first = late_iteration(len(self.accuracy) - 1)
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


def scored_late_falls(records: list[dict]) -> dict[tuple[str, str], Difference]:
    """Per (defence, attack), how much expected accuracy fell over the attack's last quarter,
    as the scoring draws see it: per sample it attacked, the draws' accuracy on what it had at
    the start of its last quarter minus their accuracy on its final examples (the same draws
    score both, so the difference is the examples'), with its paired 95 % interval."""
    falls: dict[tuple[str, str], list[float]] = {}
    for record in records:
        if "late_predictions" in record and "skipped_by" not in record:
            late = outcome({**record, "predictions": record["late_predictions"]}).expected
            falls.setdefault((record["defense"], record["attack"]), []).append(late - outcome(record).expected)
    return {key: paired_difference(values) for key, values in falls.items()}


def continues(attack: AttackConfig, start: AttackConfig) -> bool:
    """Whether ``attack`` carries ``start`` on: the same kind, threat and surrogate, from its
    examples. What it gains is then what ``start`` had left on the table."""
    return (attack.start_from == start.name and attack.kind == start.kind
            and threat_group(attack) == threat_group(start) and attack.surrogate == start.surrogate
            and attack.loss == start.loss and attack.deviation == start.deviation)


@dataclass(frozen=True)
class Continuation:
    """``attack`` continued ``start`` on ``defense``; ``gain``: how much expected accuracy fell
    from the start's examples to its own, paired over the samples it attacked."""

    defense: str
    start: str
    attack: str
    gain: Difference


def continuation_gains(records: list[dict], config: ExperimentConfig) -> list[Continuation]:
    """Every continuation in ``config`` with the gain its records show."""
    attacks = {a.name: a for a in config.attacks}
    by_key = {(r["defense"], r["attack"], r["index"]): r for r in records}
    gains: dict[tuple[str, str, str], list[float]] = {}
    for record in records:
        attack = attacks.get(record["attack"])
        if attack is None or attack.start_from not in attacks or "skipped_by" in record:
            continue
        start = by_key.get((record["defense"], attack.start_from, record["index"]))
        if start is not None and continues(attack, attacks[attack.start_from]):
            gains.setdefault((record["defense"], attack.start_from, attack.name), []).append(
                outcome(start).expected - outcome(record).expected)
    return [Continuation(*key, paired_difference(values)) for key, values in gains.items()]


@dataclass(frozen=True)
class Convergence:
    """One attack on one defence (``owner``; ``victim=<name>`` for transfer): its trace, its
    scored fall over the last quarter and its continuation, where each exists."""

    owner: str
    attack: str
    curve: Curve | None
    scored_fall: Difference | None
    continuation: Continuation | None

    @property
    def basis(self) -> str:
        """Which measure decides: ``continuation``, ``scored`` or ``trace``."""
        if self.continuation is not None:
            return "continuation"
        return "scored" if self.scored_fall is not None else "trace"

    @property
    def fall(self) -> float:
        """The fall the deciding measure shows (a fraction of accuracy)."""
        if self.continuation is not None:
            return self.continuation.gain.mean
        return self.scored_fall.mean if self.scored_fall is not None else self.curve.late_drop

    @property
    def converged(self) -> bool:
        return self.fall <= TOLERANCE


def convergence(traces: list[dict], records: list[dict], config: ExperimentConfig) -> list[Convergence]:
    """Every attack that has a trace, a scored fall or a continuation, per defence."""
    traced = {(c.owner, c.attack): c for c in curves(traces)}
    scored = scored_late_falls(records)
    continued = {(c.defense, c.start): c for c in continuation_gains(records, config)}
    keys = list(dict.fromkeys([*traced, *scored, *continued]))
    return [Convergence(owner, attack, traced.get((owner, attack)), scored.get((owner, attack)),
                        continued.get((owner, attack))) for owner, attack in keys]


def convergence_summary(traces: list[dict], records: list[dict], config: ExperimentConfig) -> dict[str, dict]:
    """``{"<owner>/<attack>": {converged, basis, fall, ...}}`` with each measure's figures where
    it exists (``late_drop`` and ``late_drop_error`` from the trace; ``scored_late_drop`` with its
    interval; ``continued_by`` and ``continuation_gain`` with its interval)."""
    summary = {}
    for item in convergence(traces, records, config):
        entry: dict = {"converged": item.converged, "basis": item.basis, "fall": item.fall}
        if item.curve is not None:
            c = item.curve
            entry |= {"late_drop": c.late_drop, "late_drop_error": c.late_drop_error,
                      "final_accuracy": c.accuracy[-1], "steps": c.steps[-1], "samples": c.samples}
        if item.scored_fall is not None:
            f = item.scored_fall
            entry |= {"scored_late_drop": f.mean, "scored_late_drop_interval": [f.low, f.high],
                      "scored_samples": f.total}
        if item.continuation is not None:
            g = item.continuation.gain
            entry |= {"continued_by": item.continuation.attack, "continuation_gain": g.mean,
                      "continuation_gain_interval": [g.low, g.high], "continuation_samples": g.total}
        summary[f"{item.owner}/{item.attack}"] = entry
    return summary
