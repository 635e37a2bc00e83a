"""Where an evaluation's time went: each (defence, attack, batch) unit's wall time and the
samples it attacked, kept in ``timings.jsonl`` and summed per (defence, attack) for the report,
so a researcher can see what each attack costs per sample and plan a larger run from it."""
from __future__ import annotations

from collections import defaultdict


def unit_timing(defense: str, attack: str, batch: int, seconds: float, records: list[dict]) -> dict:
    """One unit's line: its seconds (in one process, warm-start sources it had to craft
    included) and how many of its samples it attacked rather than skipped (cascade)."""
    attacked = sum("skipped_by" not in record for record in records)
    return {"defense": defense, "attack": attack, "batch": batch, "seconds": round(seconds, 2),
            "samples": len(records), "attacked": attacked}


def time_summary(timings: list[dict]) -> dict:
    """Per (defence, attack): process-seconds, units, samples attacked and seconds per attacked
    sample; in all: process-seconds, and about how long the same units would have taken with
    every sample attacked (no cascade), at each pair's measured cost per attacked sample (a
    pair that attacked no sample adds its own seconds: its cost per sample is unknown). A unit
    timed twice (redone, e.g. after its records were deleted) counts once: its last time."""
    units = {(t["defense"], t["attack"], t["batch"]): t for t in timings}
    pairs: dict[tuple[str, str], dict] = defaultdict(lambda: {"seconds": 0.0, "units": 0, "samples": 0, "attacked": 0})
    for (defense, attack, _), unit in units.items():
        pair = pairs[defense, attack]
        pair["seconds"] += unit["seconds"]
        pair["units"] += 1
        pair["samples"] += unit["samples"]
        pair["attacked"] += unit["attacked"]
    rows = [{"defense": defense, "attack": attack, **pair,
             "seconds_per_attacked_sample": pair["seconds"] / pair["attacked"] if pair["attacked"] else None}
            for (defense, attack), pair in pairs.items()]
    without_cascade = sum(row["seconds_per_attacked_sample"] * row["samples"] if row["attacked"] else row["seconds"]
                          for row in rows)
    return {"units": len(units), "seconds": sum(row["seconds"] for row in rows),
            "seconds_without_cascade": without_cascade, "pairs": rows}


def duration(seconds: float | None) -> str:
    """Seconds as ``h:mm:ss (h:mm:ss)``, written one way by every report and command."""
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d} (h:mm:ss)"
