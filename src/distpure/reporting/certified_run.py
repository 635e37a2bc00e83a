"""A certification run as its report reads it: the config, the resolved settings, the records,
the sessions and the metadata of one run directory, and what the report derives from them
(images planned, the summary, the hardware, each setting's reach, the image dimension)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from ..attacks.base import parse_epsilon
from ..certification.config import CertifyConfig, SettingConfig, load_certify_config
from ..certification.runner import certify_records
from ..certification.statistics import max_certifiable_radius
from ..certification.summary import summarize_records
from ..evaluation.rundir import RunDirectory
from ..evaluation.runner import load_experiment_data


@dataclass
class CertifiedRun:
    """What the report reads: the config, the resolved settings (resolved.json's ``settings``),
    the records, the sessions and the metadata of one certification run directory."""

    files: RunDirectory
    config: CertifyConfig
    resolved: dict
    records: list[dict]
    sessions: list[dict]
    metadata: dict

    @classmethod
    def load(cls, run_dir: str | Path, config: CertifyConfig | None = None) -> "CertifiedRun":
        """The run in ``run_dir``, described by ``config`` (default: the config.yaml it holds)."""
        files = RunDirectory(run_dir)
        if config is None and not files.config.is_file():
            raise FileNotFoundError(f"{files.root}: not a run directory (no config.yaml)")
        resolved = json.loads(files.resolved.read_text())["settings"] if files.resolved.is_file() else {}
        return cls(files, config or load_certify_config(files.config), resolved, certify_records(files),
                   files.read_sessions(), files.read_metadata())

    @property
    def planned(self) -> dict[str, int | None]:
        """Images per setting: as the latest session recorded them; for runs from before that,
        the config's (data limit and setting limits; None without a data limit)."""
        recorded = next((s["planned"] for s in reversed(self.sessions) if "planned" in s), {})
        limit = self.config.data.limit
        return {s.name: recorded.get(s.name, None if limit is None else self.config.images(s, limit))
                for s in self.config.settings}

    @property
    def summary(self) -> dict:
        return summarize_records(self.records, [s.name for s in self.config.settings],
                                 self.config.report_radii, self.planned)

    @property
    def hardware(self) -> dict | None:
        """What ran it: the finished run's metadata, else the latest session's (a stopped run)."""
        return self.metadata.get("hardware") or (self.sessions[-1] if self.sessions else {}).get("hardware")

    def reach(self, setting: SettingConfig) -> float:
        """The largest radius ``setting``'s n can ever certify (every draw right)."""
        return max_certifiable_radius(self.config.draws(setting), self.config.alpha, setting.sigma)

    def dimension(self) -> int | None:
        """Values per image (channels x height x width): as the sessions recorded it, else from
        the first image of the data (None when it cannot be read here)."""
        shape = next((s["image_shape"] for s in reversed(self.sessions) if "image_shape" in s), None)
        if shape is None:
            try:
                one = replace(self.config, data=replace(self.config.data, limit=1))
                shape = load_experiment_data(one).images.shape[1:]
            except (OSError, ValueError):
                return None
        return math.prod(shape)


def radius_label(radius: float, config: CertifyConfig) -> str:
    """A reported radius as the config writes it (``128/255`` stays a fraction)."""
    written = {parse_epsilon(r): r for r in config.radii if isinstance(r, str)}
    return written.get(radius, f"{radius:g}")
