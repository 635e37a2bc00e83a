"""The evaluation protocol: which defence is scored, with which noise, and how a randomized
defence's predictions become accuracy.

Every example is classified by ``draws`` independent purifications whose noise no attacker saw
(deterministic defences need one); a record keeps each draw's prediction. From them come the
three scorings of randomized defences used by DiffHammer and DiffBreak:

- ``expected``: the fraction of draws that are right, averaged over samples (one submission);
- ``worst``: right in all R draws (an attacker who may resubmit until a draw is wrong);
- ``majority``: the class most draws predict is right (a defender who votes over R draws);
  a tie counts against the defence.

An attack may also give its own verdict (AutoAttack's ``broken``, kept on deterministic defences
only): such a sample is wrong in every draw, whatever the draws say, so unbroken-looking clean
images are never rescored as robust.

The **worst case** over several attacks is an attacker's choice, per sample, of one candidate
example, made from what the attacker can see: its own queries, the ``selection_predictions``
of a stream apart from the scoring draws. The picked example is then scored by the scoring
draws, which nothing chose. Picking by the scoring draws themselves would score the least of K
noisy estimates, biased low. Records from before selection draws (distpure 0.2 and earlier)
are split instead: the first half of their draws selects, the second half scores.
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
SELECTION_FIELD = "selection_predictions"


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
    """The defences that classify a batch ``draws`` times: ``frozen`` (the attacker's own fixed
    draw, the deterministic white-box threat model) alone; a deterministic defence once; else
    ``draws`` copies of ``defense``, each with a noise stream of its own derived from ``seed``
    (a random defence that cannot draw its own stream is refused)."""
    if frozen is not None:
        return [frozen]
    if not defense.stochastic:
        return [defense]
    return [defense.with_noise_stream(derive_seed(seed, "score", draw)) for draw in range(draws)]


def selection_stream(seed: int) -> int:
    """The noise stream of a unit's selection draws (the attacker's queries), apart from the
    stream ``seed`` of its scoring draws: the same for a new run and a rescored one."""
    return derive_seed(seed, "selection")


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


def selection_and_scoring(record: dict) -> tuple[list[int], dict]:
    """The attacker's queries of a record's example (its selection draws) and the record that
    scores it. A record without selection draws splits its scoring draws: the first half selects
    and the second half scores (one draw, of a deterministic defence, does both: it has no noise
    to pick on)."""
    if SELECTION_FIELD in record:
        return [int(p) for p in record[SELECTION_FIELD]], record
    if "predictions" not in record or len(record["predictions"]) < 2:
        return ([int(record["predictions"][0])] if "predictions" in record else []), record
    predictions = record["predictions"]
    half = len(predictions) // 2
    return predictions[:half], {**record, "predictions": predictions[half:]}


def attacker_estimate(record: dict, draws: int | None = None) -> float:
    """The accuracy the attacker sees on a record's example: the fraction of its first ``draws``
    selection draws (all when None) that are right; 0 where an attack's verdict broke it."""
    selection, _ = selection_and_scoring(record)
    if record.get("verdict") == "broken":
        return 0.0
    if not selection:  # a record from before scoring draws: its one draw
        return float(bool(record["correct"]))
    seen = selection[:draws] if draws is not None else selection
    return sum(p == int(record["label"]) for p in seen) / len(seen)


def selection_draw_count(record: dict) -> int:
    """How many selection draws a record offers the attacker."""
    return max(1, len(selection_and_scoring(record)[0]))


def picked_record(candidates: list[dict], draws: int | None = None) -> dict:
    """The candidate (one record per attack, in cascade order: weakest first) an attacker submits
    for a sample: the lowest accuracy on its own ``draws`` selection draws. Ties go to the latest
    (the stronger attack by the config's order), except at zero, where they go to the earliest:
    the cascade stops attacking there, so the pick is the same with the cascade or without."""
    estimates = [attacker_estimate(record, draws) for record in candidates]
    lowest = min(estimates)
    tied = [position for position, estimate in enumerate(estimates) if estimate == lowest]
    return candidates[tied[0] if lowest == 0.0 else tied[-1]]


def picked_outcome(candidates: list[dict], draws: int | None = None) -> Outcome:
    """A sample's worst case: the picked candidate's outcome on the draws that did not pick it."""
    return outcome(selection_and_scoring(picked_record(candidates, draws))[1])


def resubmission_outcome(candidates: list[dict]) -> Outcome:
    """Right in every draw of every attack: an attacker who may submit all K candidates, each R
    times (K x R submissions), and wins on any wrong draw. Stronger than any one submission."""
    worst = all(outcome(record).worst for record in candidates)
    return Outcome(float(worst), worst, worst)


def scored_accuracy(outcomes: list[Outcome], scoring: str) -> Accuracy:
    """Accuracy with a 95 % interval under ``scoring`` (Wilson for the binary scorings and for
    expected accuracy over one draw; a normal interval of the mean over several draws)."""
    values = [o.by(scoring) for o in outcomes]
    if all(v in (0.0, 1.0) for v in values):
        return accuracy(int(sum(values)), len(values))
    return mean_interval(values)
