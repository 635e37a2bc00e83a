"""The run directory, defined once: every file an evaluation writes and a report reads.

- ``config.yaml``: the experiment as given (after ``--set`` overrides);
- ``resolved.json``: every defence's full settings after defaults, and the package version;
- ``results.jsonl``: one record per (sample, defence, attack), appended as it is produced
  (``results.rank<N>.jsonl`` per process under torchrun, merged at the end);
- ``warnings.jsonl``: what attacks warned about (AutoAttack's checks), per defence and attack;
- ``traces.jsonl``: each crafted batch's convergence trace (per iteration: the attacker's mean
  loss and its accuracy on its own draws), per defence (or victim, for transfer) and attack;
- ``timings.jsonl``: each (defence, attack, batch) unit's wall time and how many samples it
  attacked (see ``timing``);
- ``sessions.jsonl``: when each (resumed) session of the run started, and on what hardware and
  resolved precision (a long run may be resumed on other machines); a ``distpure rescore``
  session's line also holds its settings under ``rescore``;
- ``metadata.json``, ``summary.json``: written when the run finishes;
- ``examples/<defence>__<attack>.safetensors``: a few clean / adversarial / purified images;
- ``crafted/<defence>__<attack>/batch<N>.safetensors``: every adaptive attack's examples of the
  samples it attacked (float32, with their positions in the batch), kept so that an attack
  appended later starts from them instead of recrafting its whole chain of warm starts;
- ``crafted/<defence>__<attack>/batch<N>.progress.pt``: a PGD attack's progress while it is
  being crafted (its iterate and noise streams after the last iteration; see ``pgd.pgd``), so
  that a session killed mid-attack loses at most one iteration; deleted once its unit's records
  are written (a warm start's, once its examples are kept);
- ``report.md``, ``results.csv``, ``plots/``: written by ``distpure report``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch

from ..atomic import write_atomically
from ..models.weights import torch_load_weights_only
from .records import read_records, record_key

_LOG = logging.getLogger("distpure")


class RunDirectory:
    """The paths of one run directory, and the reads that both the runner and the report need."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.resolved = self.root / "resolved.json"
        self.results = self.root / "results.jsonl"
        self.warnings = self.root / "warnings.jsonl"
        self.traces = self.root / "traces.jsonl"
        self.timings = self.root / "timings.jsonl"
        self.sessions = self.root / "sessions.jsonl"
        self.metadata = self.root / "metadata.json"
        self.summary = self.root / "summary.json"
        self.examples = self.root / "examples"
        self.crafted = self.root / "crafted"
        self.report = self.root / "report.md"
        self.csv = self.root / "results.csv"
        self.plots = self.root / "plots"

    def shard_results(self, rank: int) -> Path:
        return self.root / f"results.rank{rank}.jsonl"

    def example_file(self, defense: str, attack: str) -> Path:
        return self.examples / f"{defense}__{attack}.safetensors"

    def crafted_file(self, defense: str, attack: str, batch: int) -> Path:
        return self.crafted / f"{defense}__{attack}" / f"batch{batch:04d}.safetensors"

    def progress_file(self, defense: str, attack: str, batch: int) -> Path:
        return self.crafted_file(defense, attack, batch).with_suffix(".progress.pt")

    def shard_result_files(self) -> list[Path]:
        return sorted(self.root.glob("results.rank*.jsonl"))

    @property
    def finished(self) -> bool:
        """A summary exists and no shard file waits to be merged."""
        return self.summary.is_file() and not self.shard_result_files()

    def records(self) -> list[dict]:
        """Every complete record, the merged file's and the shards', one per key, in key order."""
        records = {}
        for path in [self.results, *self.shard_result_files()]:
            for record in read_records(path):
                records[record_key(record)] = record
        return [records[key] for key in sorted(records)]

    def read_metadata(self) -> dict:
        return json.loads(self.metadata.read_text()) if self.metadata.is_file() else {}

    def read_sessions(self) -> list[dict]:
        return read_records(self.sessions)

    def read_timings(self) -> list[dict]:
        """Every timed unit (a run from before timings were kept has none)."""
        return read_records(self.timings)

    def read_warnings(self) -> list[dict]:
        return read_records(self.warnings)

    def read_traces(self) -> list[dict]:
        """One trace per (owner, attack, batch): the last written (a batch re-crafted after a
        resume writes its trace again, identically)."""
        traces = {(t["owner"], t["attack"], t["batch"]): t for t in read_records(self.traces)}
        return list(traces.values())


#: the key of a ``distpure rescore`` session's line in ``sessions.jsonl`` (its settings)
RESCORE = "rescore"


def evaluation_sessions(sessions: list[dict]) -> list[dict]:
    """The sessions of ``evaluate``, which made the records (not those of ``rescore``)."""
    return [session for session in sessions if RESCORE not in session]


class ProgressFile:
    """An attack's progress (``pgd.ProgressStore``) in one file of the run directory, rewritten
    whole after every iteration with the seconds spent on the attack so far, over sessions
    (``earlier_seconds``: what a loaded file had, counted even where the attack then discards
    progress made on other inputs, as that time was spent); ``on_save`` runs after each save
    (the run saves its wall clock). An unreadable file (cut short by a full disk) counts as none."""

    def __init__(self, path: Path, on_save: Callable[[], None] | None = None) -> None:
        self.path = path
        self.on_save = on_save
        self.earlier_seconds = 0.0
        self._started = time.monotonic()

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            saved = torch_load_weights_only(self.path)
        except ValueError as error:
            saved = error
        if not (isinstance(saved, dict) and isinstance(saved.get("progress"), dict) and "seconds" in saved):
            _LOG.warning("cannot read %s (%s): the attack starts afresh", self.path,
                         saved if isinstance(saved, ValueError) else "not an attack's progress")
            self.clear()
            return None
        self.earlier_seconds = float(saved["seconds"])
        return saved["progress"]

    def save(self, progress: dict) -> None:
        seconds = self.earlier_seconds + time.monotonic() - self._started
        write_atomically(self.path, lambda tmp: torch.save({"progress": progress, "seconds": seconds}, tmp))
        if self.on_save is not None:
            self.on_save()

    def clear(self) -> None:
        """Delete the progress, and any save a killed session left half-written."""
        self.path.unlink(missing_ok=True)
        self.path.with_name(self.path.name + ".tmp").unlink(missing_ok=True)
