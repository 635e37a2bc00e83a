"""``results.csv``: every (defence, attack) row in wide form, with the defence's settings and
every scoring, for spreadsheets and plotting scripts."""
from __future__ import annotations

import csv
import math
from pathlib import Path

from ..evaluation.protocol import SCORINGS
from .markdown import PURIFIER_COLUMNS
from .run import Run



def write_csv(run: Run, path: Path) -> None:
    extra = sorted({key for d in run.config.defenses for key in d.purifier} - set(PURIFIER_COLUMNS))
    scored = [f"{scoring}_{part}" for scoring in SCORINGS for part in ("accuracy", "ci_low", "ci_high")]
    fields = ["defense", "defense_kind", "attack", "kind", "norm", "eps", "eot", "steps", "frozen_noise",
              *PURIFIER_COLUMNS, *extra, "diffusion", "draws", "scoring", "correct", "total", "skipped", "accuracy", "ci_low",
              "ci_high", *scored, "paper"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in run.rows:
            settings = run.settings[row["defense"]]
            flat = {key: value for key, value in row.items() if key in fields}
            flat["defense_kind"] = run.defenses[row["defense"]].kind
            flat.update({key: settings.get(key) for key in [*PURIFIER_COLUMNS, *extra, "diffusion"]})
            writer.writerow({key: "" if _is_missing(value) else value for key, value in flat.items()})


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
