"""The evaluation protocol: which defence is scored, with which noise, and how a randomized
defence's predictions become accuracy.

Every example is classified by ``draws`` independent purifications whose noise no attacker saw
(deterministic defences need one); a record keeps each draw's prediction. From them come the
three scorings of randomized defences used by DiffHammer and DiffBreak:

- ``expected``: the fraction of draws that are right, averaged over samples (one submission);
- ``worst``: right in all R draws (an attacker who may resubmit until a draw is wrong);
- ``majority``: the class most draws predict is right (a defender who votes over R draws);
  a tie counts against the defence.

An attack may also give its own verdict (AutoAttack's ``broken``): such a sample is wrong in
every draw, whatever the draws say, so unbroken-looking clean images are never rescored as
robust.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from ..attacks.suite import AttackConfig
from ..defenses.defended import DefendedClassifier
from ..seeding import derive_seed
from .stats import Accuracy, accuracy, mean_interval

SCORINGS = ("expected", "worst", "majority")


@dataclass(frozen=True)
class Outcome:
    """How one sample fared under one attack, by each scoring."""

    expected: float
    worst: bool
    majority: bool

    def by(self, scoring: str) -> float:
        return float(getattr(self, scoring))


def threat_group(attack: AttackConfig) -> tuple[str, float, bool]:
    """(norm, ε, frozen noise): the attacks of one group threaten the same samples under one
    threat model, so a sample is robust only if it survives all of them (and is right clean)."""
    return attack.norm, round(attack.eps, 8), attack.frozen_noise


def scorers(defense: DefendedClassifier, draws: int, seed: int, frozen: DefendedClassifier | None = None
            ) -> list[DefendedClassifier]:
    """The defences that score a batch: ``frozen`` (the attacker's own fixed draw, the
    deterministic white-box threat model) alone; a deterministic defence once; else ``draws``
    copies of ``defense``, each with a noise stream of its own derived from ``seed``."""
    if frozen is not None:
        return [frozen]
    if not defense.stochastic or not hasattr(defense.purifier, "variant"):
        return [defense] * (draws if defense.stochastic else 1)
    return [defense.with_purifier(defense.purifier.variant(seed=derive_seed(seed, "score", draw)))
            for draw in range(draws)]


@torch.no_grad()
def predict_draws(models: list[DefendedClassifier], images: torch.Tensor) -> list[list[int]]:
    """Per sample, the class each scoring model predicts (a sample's list of R predictions)."""
    columns = [model(images).argmax(1).tolist() for model in models]
    return [list(row) for row in zip(*columns)]


def draw_count(record: dict) -> int:
    """How many scoring draws a record holds (records from before scoring draws hold one)."""
    return len(record.get("predictions", [None]))


def outcome(record: dict) -> Outcome:
    """The three scorings of one record (an attack's ``broken`` verdict makes every draw wrong;
    a record from before scoring draws is its one draw's ``correct``)."""
    if record.get("verdict") == "broken":
        return Outcome(0.0, False, False)
    if "predictions" not in record:
        right = bool(record["correct"])
        return Outcome(float(right), right, right)
    predictions, label = [int(p) for p in record["predictions"]], int(record["label"])
    hits = sum(p == label for p in predictions)
    ranked = Counter(predictions).most_common(2)
    unique_top = len(ranked) == 1 or ranked[0][1] > ranked[1][1]
    return Outcome(hits / len(predictions), hits == len(predictions),
                   unique_top and ranked[0][0] == label)


def worst_outcome(outcomes: list[Outcome]) -> Outcome:
    """A sample's outcome over several attacks: the attacker picks, per sample and scoring, the
    attack that does best (for ``expected``, the lowest fraction of right draws)."""
    return Outcome(min(o.expected for o in outcomes), all(o.worst for o in outcomes),
                   all(o.majority for o in outcomes))


def scored_accuracy(outcomes: list[Outcome], scoring: str) -> Accuracy:
    """Accuracy with a 95 % interval under ``scoring`` (Wilson for the binary scorings and for
    expected accuracy over one draw; a normal interval of the mean over several draws)."""
    values = [o.by(scoring) for o in outcomes]
    if all(v in (0.0, 1.0) for v in values):
        return accuracy(int(sum(values)), len(values))
    return mean_interval(values)
