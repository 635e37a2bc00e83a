"""The empirical figures of an evaluation run (the honest table) that a certification report sets
beside its certified ones, read from the run's ``results.csv`` (what ``distpure report`` wrote):
per defence and threat, clean accuracy, the strongest single attack, the worst case picked on the
attacker's selection draws and the resubmission row. Each is an upper bound on robust accuracy,
valid only against the attacks that were run."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..evaluation.rundir import RunDirectory

#: the committed honest evaluation (README's table), beside the checkout's sources
HONEST_RUN = Path(__file__).resolve().parents[3] / "results" / "cifar10-honest"
#: the defences set beside certified accuracy: adversarial training, DiffPure and the paper's
COMPARED = ("pgd-at", "diffpure", "victim-guided")
#: summary rows that are not an attack of their own
_DERIVED = ("clean", "worst-case", "resubmission")


@dataclass(frozen=True)
class Figure:
    """One accuracy of the evaluation: which row (``attack``), its headline ``scoring`` over
    ``draws`` scoring draws per sample, on ``samples`` samples, with its 95 % interval."""

    attack: str
    accuracy: float
    low: float
    high: float
    samples: int
    draws: int
    scoring: str

    def __str__(self) -> str:
        return f"{100 * self.accuracy:.1f} [{100 * self.low:.1f}, {100 * self.high:.1f}]"


@dataclass(frozen=True)
class ThreatFigures:
    """A defence's figures under one threat (norm, ε): clean, the strongest attack, the worst
    case picked on selection draws, and resubmission (None where the run has no such row)."""

    defence: str
    clean: Figure | None
    strongest: Figure | None
    picked: Figure | None
    resubmission: Figure | None


def read_rows(run_dir: str | Path) -> list[dict] | None:
    """The rows of ``run_dir``'s results.csv, or None when it has none."""
    path = RunDirectory(run_dir).csv
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def _figure(row: dict) -> Figure:
    return Figure(row["attack"], float(row["accuracy"]), float(row["ci_low"]), float(row["ci_high"]),
                  int(row["total"]), int(row["draws"]), row["scoring"])


def _in_threat(row: dict, norm: str, eps: float) -> bool:
    """A row of the (norm, ε) threat with samples (frozen-noise rows are another threat model)."""
    return (row["norm"] == norm and abs(float(row["eps"]) - eps) < 1e-6 and row["frozen_noise"] != "True"
            and int(row["total"] or 0) > 0)


def threat_figures(rows: list[dict], norm: str, eps: float,
                   defences: tuple[str, ...] = COMPARED) -> list[ThreatFigures]:
    """Per defence of ``defences`` that ``rows`` hold (in that order), its figures under the
    (``norm``, ``eps``) threat; the strongest attack has the lowest headline accuracy, as the
    evaluation report's *At a glance* table picks it."""
    found = []
    for defence in defences:
        mine = [r for r in rows if r["defense"] == defence]
        if not mine:
            continue
        threat = [r for r in mine if _in_threat(r, norm, eps)]
        attacks = [r for r in threat if r["kind"] not in _DERIVED]
        derived = {r["kind"]: _figure(r) for r in threat if r["kind"] in _DERIVED}
        clean = next((_figure(r) for r in mine if r["kind"] == "clean" and int(r["total"] or 0)), None)
        strongest = min(attacks, key=lambda r: float(r["accuracy"]), default=None)
        found.append(ThreatFigures(defence, clean, None if strongest is None else _figure(strongest),
                                   derived.get("worst-case"), derived.get("resubmission")))
    return found


def threats(rows: list[dict], norm: str) -> list[float]:
    """The ε of every ``norm`` threat group of the run (those with a worst-case row), ascending."""
    return sorted({float(r["eps"]) for r in rows if r["norm"] == norm and r["kind"] == "worst-case"})
