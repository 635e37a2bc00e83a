"""Certified accuracy from the records of a certification run, finished or not.

A sample counts as certified-correct at radius r when the selected class is its label, CERTIFY
did not abstain and its radius is at least r. A partial run is summarised over the images it
has records for (the seeded data order makes any prefix a fair sample); ``images`` says how many.
"""
from __future__ import annotations

from scipy.stats import norm

from ..evaluation.stats import accuracy, mean_interval


def certified_correct(record: dict, radius: float) -> bool:
    """Whether ``record`` certifies its label within L2 ``radius``."""
    return (bool(record["correct"]) and record["radius"] is not None
            and float(record["radius"]) >= radius - 1e-12)


def summarize_records(records: list[dict], settings: list[str], radii: tuple[float, ...],
                      planned: dict[str, int] | None = None) -> dict:
    """Per setting (in ``settings``' order): images with a record (of ``planned``), certified
    accuracy at each of ``radii`` with a 95 % Wilson interval over images, the abstention rate
    (among samples estimated; a skipped sample picked a wrong class and drew no estimate),
    the skipped and curtailed counts, and mean seconds and denoiser calls per image."""
    summary = {}
    for name in settings:
        rows = [r for r in records if r["setting"] == name]
        total = len(rows)
        estimated = [r for r in rows if not r.get("skipped")]
        certified = {}
        for radius in radii:
            result = accuracy(sum(certified_correct(r, radius) for r in rows), total)
            certified[f"{radius:.6g}"] = {"value": result.value, "low": result.low, "high": result.high,
                                          "correct": int(result.correct)}
        summary[name] = {
            "images": total, "planned": (planned or {}).get(name),
            "sigma": rows[0]["sigma"] if rows else None,
            "certified": certified,
            "abstained": sum(bool(r["abstained"]) for r in estimated),
            "abstention_rate": (sum(bool(r["abstained"]) for r in estimated) / len(estimated)
                                if estimated else None),
            "skipped": total - len(estimated),
            "curtailed": sum(bool(r.get("curtailed")) for r in rows),
            "seconds_per_image": sum(r["seconds"] for r in rows) / total if total else None,
            "denoiser_calls_per_image": sum(r["denoiser_calls"] for r in rows) / total if total else None,
        }
    return summary


def selection_share(record: dict) -> float:
    """The share of ``record``'s n0 selection draws in which the base classifier (denoiser and
    victim) returned the label: an unbiased estimate of its accuracy under the smoothing noise
    on that image (selection draws are never curtailed or skipped)."""
    counts = record["selection_counts"]
    return counts[int(record["label"])] / sum(counts)


def ceiling_radius(share: float, sigma: float) -> float | None:
    """The radius an image whose base classifier is right with probability ``share`` would
    certify with unlimited draws, σ·Φ⁻¹(share); None at or below 1/2 (never certified)."""
    return sigma * float(norm.ppf(share)) if share > 0.5 else None


def base_accuracy(records: list[dict], setting: str, radii: tuple[float, ...]) -> dict:
    """Why a setting certifies what it does: its base classifier's accuracy per draw (the mean
    selection share over images, with a 95 % interval) and, per radius of ``radii``, how many
    images reach it by their ceiling radius (unlimited draws, the share taken as exact)."""
    rows = [r for r in records if r["setting"] == setting]
    shares = [selection_share(r) for r in rows]
    ceilings = [ceiling_radius(share, float(r["sigma"])) for share, r in zip(shares, rows)]
    return {"images": len(rows), "per_draw": mean_interval(shares),
            "reaching": {f"{radius:.6g}": sum(c is not None and c >= radius - 1e-12 for c in ceilings)
                         for radius in radii}}


def format_summary(summary: dict, radii: tuple[float, ...]) -> str:
    """A plain-text table: certified accuracy (%) per setting at each radius, abstention rate,
    and how many records (of how many planned)."""
    header = ["setting", "sigma", *[f"r={r:.3g}" for r in radii], "abstain %", "records"]
    lines = [header]
    for name, row in summary.items():
        abstention = row["abstention_rate"]
        done = f"{row['images']}" + (f"/{row['planned']}" if row.get("planned") is not None else "")
        lines.append([name, f"{row['sigma']}" if row["sigma"] is not None else "-",
                      *[f"{100 * row['certified'][f'{r:.6g}']['value']:.1f}" if row["images"] else "-"
                        for r in radii],
                      f"{100 * abstention:.1f}" if abstention is not None else "-", done])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)) for line in lines)
