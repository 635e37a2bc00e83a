"""From records to the accuracy table: one row per (defence, attack) with a Wilson interval."""
from __future__ import annotations

from ..attacks.suite import AttackConfig
from .config import DefenseConfig, ExperimentConfig
from .stats import accuracy


def summarize(records: list[dict], config: ExperimentConfig) -> dict:
    """Accuracy per (defence, attack), in config order, with the paper's number where stated,
    then per defence the worst case over the attacks of each threat model (see ``worst_cases``)."""
    rows = []
    for defense in config.defenses:
        for attack in config.attacks:
            outcomes = [r["correct"] for r in records
                        if r["defense"] == defense.name and r["attack"] == attack.name]
            rows.append(_row(config, defense, attack.name, outcomes,
                             {"kind": attack.kind, "norm": attack.norm, "eps": attack.eps,
                              "eot": attack.eot, "steps": attack.steps}))
    groups = worst_cases(config)
    for defense in config.defenses:
        correct = {(r["index"], r["attack"]): r["correct"] for r in records if r["defense"] == defense.name}
        indices = sorted({index for index, _ in correct})
        for name, attacks in groups.items():
            outcomes = [all(correct[index, a.name] for a in attacks) for index in indices
                        if all((index, a.name) in correct for a in attacks)]
            rows.append(_row(config, defense, name, outcomes,
                             {"kind": "worst-case", "norm": attacks[0].norm, "eps": attacks[0].eps,
                              "eot": max(a.eot for a in attacks), "steps": max(a.steps for a in attacks),
                              "over": [a.name for a in attacks]}))
    return {"experiment": config.name, "description": config.description, "rows": rows}


def worst_cases(config: ExperimentConfig) -> dict[str, list[AttackConfig]]:
    """Threat models attacked more than once: a sample counts as robust only if it survives every
    attack of its (norm, ε) group, as AutoAttack reports its ensemble. Named ``worst-case``, or
    ``worst-case-<norm>-<ε>`` when the experiment has several such groups."""
    groups: dict[tuple[str, float], list[AttackConfig]] = {}
    for attack in config.attacks:
        if attack.kind != "clean":
            groups.setdefault((attack.norm, round(attack.eps, 8)), []).append(attack)
    groups = {key: attacks for key, attacks in groups.items() if len(attacks) > 1}
    if len(groups) == 1:
        return {"worst-case": next(iter(groups.values()))}
    return {f"worst-case-{norm}-{eps:g}": attacks for (norm, eps), attacks in groups.items()}


def _row(config: ExperimentConfig, defense: DefenseConfig, attack: str, outcomes: list[bool],
         threat: dict) -> dict:
    result = accuracy(sum(outcomes), len(outcomes))
    return {"defense": defense.name, "attack": attack, **threat, "purifier": defense.purifier,
            "correct": result.correct, "total": result.total,
            "accuracy": result.value, "ci_low": result.low, "ci_high": result.high,
            "paper": config.paper.get(f"{defense.name}/{attack}")}


def format_table(summary: dict) -> str:
    """A plain-text table of the summary for the terminal."""
    lines = [f"{'defence':<24} {'attack':<24} {'accuracy % [95% CI]':<24} {'n':>5}  paper"]
    for row in summary["rows"]:
        interval = f"{100 * row['accuracy']:.1f} [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]" \
            if row["total"] else "-"
        paper = "" if row["paper"] is None else f"{row['paper']}"
        lines.append(f"{row['defense']:<24} {row['attack']:<24} {interval:<24} {row['total']:>5}  {paper}")
    return "\n".join(lines)
