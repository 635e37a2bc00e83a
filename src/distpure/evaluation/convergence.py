"""Has an attack converged? Two scored measures, and the attacker's own trace:

- the **scored fall over the last quarter**: the scoring draws classify both the final examples
  and what the attack had kept at the start of its last quarter; the paired fall between them;
- a **continuation** (a later attack of the same kind and threat that starts from this one's
  examples): how much the accuracy of the same draws fell from this attack's examples to the
  continuation's;
- the **trace**: accuracy on the attacker's own draws per iteration, pooled over the batches.

Both scored measures are paired over the samples the later attack attacked (the attack
itself, or its continuation). An attack is **converged** when every scored measure it has
falls by at most ``TOLERANCE`` on average and its 95 % interval stays below
``UPPER_TOLERANCE``, on at least ``MIN_SAMPLES`` samples; **not judged** below that count;
otherwise **not converged**: more iterations (or EOT) would likely break more samples, so the
attack's robust accuracy is an upper bound. The scored measures decide where an attack has one
(the largest of them): they judge the examples the attack returns (its kept iterates) by fresh
draws, while the trace judges its current iterate on its own few draws, which is noisier and
blind to what keeping each sample's best iterate gains.
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

TOLERANCE = 0.01  # one point of accuracy: the most a converged attack's last quarter may gain on average
UPPER_TOLERANCE = 0.02  # two points: the most its 95 % interval may still allow
MIN_SAMPLES = 20  # fewer paired samples than this judge nothing
STATUSES = ("converged", "not converged", "not judged")


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


def _paired_falls(records: list[dict], field: str) -> dict[tuple[str, str], Difference]:
    """Per (defence, attack), over the samples it attacked whose records hold ``field`` (the
    same R draws' predictions on other examples of the same sample): how much expected accuracy
    fell from those examples to the final ones, with its paired 95 % interval."""
    falls: dict[tuple[str, str], list[float]] = {}
    for record in records:
        if field in record and "skipped_by" not in record:
            before = outcome({**record, "predictions": record[field]}).expected
            falls.setdefault((record["defense"], record["attack"]), []).append(before - outcome(record).expected)
    return {key: paired_difference(values) for key, values in falls.items()}


def scored_late_falls(records: list[dict]) -> dict[tuple[str, str], Difference]:
    """Per (defence, attack), how much expected accuracy fell over the attack's last quarter,
    as the scoring draws see it: on the samples it attacked, the draws' accuracy on what it had
    at the start of its last quarter minus their accuracy on its final examples."""
    return _paired_falls(records, "late_predictions")


def continues(attack: AttackConfig, start: AttackConfig) -> bool:
    """Whether ``attack`` carries ``start`` on: the same kind, threat and surrogate, from its
    examples. What it gains is then what ``start`` had left on the table."""
    return (attack.start_from == start.name and attack.kind == start.kind
            and threat_group(attack) == threat_group(start) and attack.surrogate == start.surrogate
            and attack.loss == start.loss and attack.deviation == start.deviation)


def continued_attack(config: ExperimentConfig, attack: AttackConfig) -> AttackConfig | None:
    """The attack of ``config`` that ``attack`` continues, if any."""
    start = next((a for a in config.attacks if a.name == attack.start_from), None)
    return start if start is not None and continues(attack, start) else None


@dataclass(frozen=True)
class Continuation:
    """``attack`` continued ``start`` on ``defense``; ``gain``: how much expected accuracy fell
    from the start's examples to its own, both scored by its draws, over the samples it attacked
    (the start's own records would not do: the cascade chose those samples by them)."""

    defense: str
    start: str
    attack: str
    gain: Difference


def continuation_gains(records: list[dict], config: ExperimentConfig) -> list[Continuation]:
    """Every continuation in ``config`` with the gain its records show."""
    attacks = {a.name: a for a in config.attacks}
    gains = []
    for (defense, name), gain in _paired_falls(records, "start_predictions").items():
        source = continued_attack(config, attacks[name]) if name in attacks else None
        if source is not None:
            gains.append(Continuation(defense, source.name, name, gain))
    return gains


@dataclass(frozen=True)
class Convergence:
    """One attack on one defence (``owner``; ``victim=<name>`` for transfer): its trace, its
    scored fall over the last quarter and the largest gain of a continuation, where each exists."""

    owner: str
    attack: str
    curve: Curve | None
    scored_fall: Difference | None
    continuation: Continuation | None

    @property
    def basis(self) -> str:
        """What decides: the scored measures where the attack has one (``scored``,
        ``continuation`` or both), else its own-draw ``trace``."""
        scored = [name for name, value in (("scored", self.scored_fall), ("continuation", self.continuation))
                  if value is not None]
        return " and ".join(scored) or "trace"

    @property
    def fall(self) -> float:
        """The largest fall the deciding measures show (a fraction of accuracy)."""
        gain = self.continuation.gain if self.continuation is not None else None
        scored = [d.mean for d in (self.scored_fall, gain) if d is not None]
        return max(scored) if scored else self.curve.late_drop

    @property
    def status(self) -> str:
        """``converged``, ``not converged`` or ``not judged``: by the scored measures' means and
        intervals where the attack has them (each on at least ``MIN_SAMPLES`` samples; one that
        fails on enough samples decides), else by its own-draw trace's fall and its error."""
        measures = [d for d in (self.scored_fall, self.continuation.gain if self.continuation else None)
                    if d is not None]
        if not measures:
            return self._trace_status()
        judged = [d for d in measures if d.total >= MIN_SAMPLES]
        if any(d.mean > TOLERANCE or d.high > UPPER_TOLERANCE for d in judged):
            return STATUSES[1]
        return STATUSES[0] if len(judged) == len(measures) else STATUSES[2]

    def _trace_status(self) -> str:
        """By the own-draw trace alone (no scored examples): its fall and the fall's upper end
        (two standard errors of the line), judged only on at least ``MIN_SAMPLES`` traced samples."""
        if self.curve.samples < MIN_SAMPLES:
            return STATUSES[2]
        upper = self.curve.late_drop + 2 * self.curve.late_drop_error
        return STATUSES[0] if self.curve.late_drop <= TOLERANCE and upper <= UPPER_TOLERANCE else STATUSES[1]

    @property
    def converged(self) -> bool:
        return self.status == STATUSES[0]


def convergence(traces: list[dict], records: list[dict], config: ExperimentConfig) -> list[Convergence]:
    """Every attack that has a trace, a scored fall or a continuation, per defence."""
    traced = {(c.owner, c.attack): c for c in curves(traces)}
    scored = scored_late_falls(records)
    continued: dict[tuple[str, str], Continuation] = {}
    for item in continuation_gains(records, config):  # several continuations of one start: the largest gain
        key = (item.defense, item.start)
        if key not in continued or item.gain.mean > continued[key].gain.mean:
            continued[key] = item
    keys = list(dict.fromkeys([*traced, *scored, *continued]))
    return [Convergence(owner, attack, traced.get((owner, attack)), scored.get((owner, attack)),
                        continued.get((owner, attack))) for owner, attack in keys]


def convergence_summary(traces: list[dict], records: list[dict], config: ExperimentConfig) -> dict[str, dict]:
    """``{"<owner>/<attack>": {converged, basis, fall, ...}}`` with each measure's figures where
    it exists (``late_drop`` and ``late_drop_error`` from the trace; ``scored_late_drop`` with its
    interval; ``continued_by`` and ``continuation_gain`` with its interval)."""
    summary = {}
    for item in convergence(traces, records, config):
        entry: dict = {"converged": item.converged, "status": item.status, "basis": item.basis, "fall": item.fall}
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
