"""What every part of a run's report reads: the config, the records and their summary, the
metadata and the settings each defence ran with, recomputed from the run directory."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict

from ..evaluation.config import DefenseConfig, ExperimentConfig, load_experiment
from ..evaluation.resolved import legacy_stamp
from ..evaluation.rundir import RunDirectory
from ..evaluation.summary import summarize



class Run:
    """What a report needs: the config, the records, the summary rows and the metadata."""

    def __init__(self, config: ExperimentConfig, records: list[dict], metadata: dict,
                 finished: bool, resolved: dict | None = None, warnings: list[dict] | None = None,
                 traces: list[dict] | None = None, timings: list[dict] | None = None) -> None:
        self.config = config
        self.records = records
        self.metadata = metadata
        self.finished = finished
        self.warnings = warnings or []
        self.traces = traces or []
        self.timings = timings or []
        self.sessions: list[dict] = []
        self.legacy_stamp: dict = {}  # the stamp of records from before records carried one
        self.summary = summarize(records, config)
        self.samples = len({r["index"] for r in records})
        self.samples_per_class = _samples_per_class(records)
        self.defenses = {d.name: d for d in config.defenses}
        self.cost = {name: cost["denoiser_calls"] for name, cost in (resolved or {}).get("cost", {}).items()}
        stored = (resolved or {}).get("settings", {}).get("defenses", {})
        self.settings = {d.name: _purifier_settings(d, config, stored.get(d.name)) for d in config.defenses}

    @classmethod
    def load(cls, files: RunDirectory) -> "Run":
        if not files.config.is_file():
            raise FileNotFoundError(f"{files.root}: not a run directory (no config.yaml)")
        resolved = json.loads(files.resolved.read_text()) if files.resolved.is_file() else None
        run = cls(load_experiment(files.config), files.records(), files.read_metadata(), files.finished,
                  resolved, files.read_warnings(), files.read_traces(), files.read_timings())
        run.sessions = files.read_sessions()
        run.legacy_stamp = legacy_stamp(files)
        return run

    @property
    def rows(self) -> list[dict]:
        return self.summary["rows"]

    def row(self, defense: str, attack: str) -> dict:
        return next(r for r in self.rows if r["defense"] == defense and r["attack"] == attack)


def _purifier_settings(spec: DefenseConfig, config: ExperimentConfig, resolved: dict | None) -> dict:
    """The purifier settings a defence ran with, and its diffusion model: as the run stored them,
    or (runs from before they were stored) as this version resolves the config."""
    if spec.kind != "purifier":
        return {}
    settings = resolved["purifier"] if resolved and resolved.get("purifier") else asdict(config.purifier_config(spec))
    diffusion = (resolved or {}).get("diffusion") or config.diffusion_for(spec)
    return {**{key: value for key, value in settings.items() if key != "precision"}, "diffusion": diffusion}


def _samples_per_class(records: list[dict]) -> dict[int, int]:
    """How many distinct samples of each label the records cover, by label: the class balance
    of the sample, which for a partial run is whatever prefix of the evaluation order is done."""
    labels = {r["index"]: int(r["label"]) for r in records}
    return dict(sorted(Counter(labels.values()).items()))
