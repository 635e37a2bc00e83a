"""From records to the accuracy table: one row per (defence, attack) with a Wilson interval."""
from __future__ import annotations

from .config import ExperimentConfig
from .stats import accuracy


def summarize(records: list[dict], config: ExperimentConfig) -> dict:
    """Accuracy per (defence, attack), in config order, with the paper's number where stated."""
    rows = []
    for defense in config.defenses:
        for attack in config.attacks:
            outcomes = [r["correct"] for r in records
                        if r["defense"] == defense.name and r["attack"] == attack.name]
            result = accuracy(sum(outcomes), len(outcomes))
            rows.append({"defense": defense.name, "attack": attack.name, "kind": attack.kind,
                         "norm": attack.norm, "eps": attack.eps, "eot": attack.eot,
                         "steps": attack.steps, "purifier": defense.purifier,
                         "correct": result.correct, "total": result.total,
                         "accuracy": result.value, "ci_low": result.low, "ci_high": result.high,
                         "paper": config.paper.get(f"{defense.name}/{attack.name}")})
    return {"experiment": config.name, "description": config.description, "rows": rows}


def format_table(summary: dict) -> str:
    """A plain-text table of the summary for the terminal."""
    lines = [f"{'defence':<24} {'attack':<24} {'accuracy % [95% CI]':<24} {'n':>5}  paper"]
    for row in summary["rows"]:
        interval = f"{100 * row['accuracy']:.1f} [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]" \
            if row["total"] else "-"
        paper = "" if row["paper"] is None else f"{row['paper']}"
        lines.append(f"{row['defense']:<24} {row['attack']:<24} {interval:<24} {row['total']:>5}  {paper}")
    return "\n".join(lines)
