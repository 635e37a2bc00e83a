"""From records to the accuracy table: one row per (defence, attack), each under the three
scorings of ``protocol`` with 95 % intervals, the experiment's headline scoring up front; per
threat group the worst case (one candidate per sample picked on the attacker's selection draws,
scored on the scoring draws) and the resubmission row (right in every draw of every attack)."""
from __future__ import annotations

from ..attacks.suite import AttackConfig
from .config import DefenseConfig, ExperimentConfig
from .cascade import cascade_savings, check_skips
from .protocol import (SCORINGS, Outcome, draw_count, outcome, picked_outcome, resubmission_outcome,
                       scored_accuracy, selection_and_scoring, selection_draw_count, threat_group)
from .stats import paired_difference

SCORING_LABELS = {"expected": "expected", "worst": "worst-of-R", "majority": "majority-of-R"}


def summarize(records: list[dict], config: ExperimentConfig) -> dict:
    """Rows per (defence, attack) in config order, with the paper's number where stated, then
    per defence the worst case over the attacks of each threat group (see ``worst_cases``), and
    each defence's paired difference from the ``baseline`` defence, if the config names one."""
    check_skips(records, config)
    outcomes = sample_outcomes(records)
    by_pair = sample_records(records)
    draws: dict[tuple[str, str], int] = {}
    skipped: dict[tuple[str, str], int] = {}
    for record in records:
        pair = (record["defense"], record["attack"])
        draws[pair] = max(draws.get(pair, 1), draw_count(record))
        skipped[pair] = skipped.get(pair, 0) + ("skipped_by" in record)
    rows = []
    for defense in config.defenses:
        for attack in config.attacks:
            pair = (defense.name, attack.name)
            rows.append(_row(config, defense, attack.name, list(outcomes.get(pair, {}).values()),
                             draws.get(pair, 0), {"kind": attack.kind, "norm": attack.norm,
                                                  "eps": attack.eps, "eot": attack.eot_draws,
                                                  "steps": attack.iterations,
                                                  "frozen_noise": attack.frozen_noise,
                                                  "skipped": skipped.get(pair, 0)}))
    for defense in config.defenses:
        for name, group in worst_cases(config).items():
            attacks = _attacking(group, defense.name)
            threat = next(a for a in group if a.kind != "clean")
            candidates = sample_candidates(by_pair, defense.name, attacks)
            counts = [selection_and_scoring_draws(c) for c in candidates.values()]
            common = {"norm": threat.norm, "eps": threat.eps, "eot": max((a.eot_draws for a in attacks), default=0),
                      "steps": max((a.iterations for a in attacks), default=0),
                      "frozen_noise": threat.frozen_noise, "over": [a.name for a in attacks]}
            rows.append(_row(config, defense, name, [picked_outcome(c) for c in candidates.values()],
                             min((r for _, r in counts), default=0),
                             {"kind": "worst-case", **common,
                              "selection_draws": min((s for s, _ in counts), default=0)}))
            rows.append(_row(config, defense, resubmission_name(name),
                             [resubmission_outcome(c) for c in candidates.values()],
                             max((draws.get((defense.name, a.name), 0) for a in attacks), default=0),
                             {"kind": "resubmission", **common}))
    return {"experiment": config.name, "description": config.description,
            "scoring": config.evaluation.headline, "draws": config.evaluation.draws,
            "selection_draws": config.evaluation.selection_draws, "rows": rows,
            "selection_sweep": selection_sweep(config, by_pair),
            "cascade": cascade_savings(records, config), "comparisons": paired_comparisons(config, by_pair)}


def resubmission_name(worst_case: str) -> str:
    """The resubmission row of a worst-case row (``worst-case-l2-0.5`` -> ``resubmission-l2-0.5``)."""
    return worst_case.replace("worst-case", "resubmission", 1)


def selection_and_scoring_draws(candidates: list[dict]) -> tuple[int, int]:
    """(selection draws, scoring draws) that a sample's worst case rests on: the fewest any of
    its candidates offers."""
    return (min(selection_draw_count(r) for r in candidates),
            min(draw_count(selection_and_scoring(r)[1]) for r in candidates))


SWEEP_DRAWS = (1, 2, 4, 8, 16, 32)


def selection_sweep(config: ExperimentConfig, by_pair: dict[tuple[str, str], dict[int, dict]]) -> list[dict]:
    """Per defence and threat group, the worst case's expected accuracy when the attacker picks on
    its first 1, 2, 4, ... selection draws (as many as the records hold): the figure falls as the
    attacker sees more and settles once more queries no longer change its picks."""
    sweep = []
    for defense in config.defenses:
        for name, group in worst_cases(config).items():
            candidates = sample_candidates(by_pair, defense.name, _attacking(group, defense.name))
            if not candidates:
                continue
            available = min(selection_and_scoring_draws(c)[0] for c in candidates.values())
            for count in (n for n in SWEEP_DRAWS if n <= available):
                result = scored_accuracy([picked_outcome(c, count) for c in candidates.values()], "expected")
                sweep.append({"defense": defense.name, "column": name, "selection_draws": count,
                              "accuracy": result.value, "ci_low": result.low, "ci_high": result.high,
                              "total": result.total})
    return sweep


def sample_outcomes(records: list[dict]) -> dict[tuple[str, str], dict[int, Outcome]]:
    """Per (defence, attack), each sample's outcome by its index."""
    outcomes: dict[tuple[str, str], dict[int, Outcome]] = {}
    for record in records:
        outcomes.setdefault((record["defense"], record["attack"]), {})[int(record["index"])] = outcome(record)
    return outcomes


def _attacking(group: list[AttackConfig], defense: str) -> list[AttackConfig]:
    """The attacks of a threat group that run against ``defense``: none if only clean does."""
    attacks = [a for a in group if a.applies_to(defense)]
    return [] if all(a.kind == "clean" for a in attacks) else attacks


def sample_records(records: list[dict]) -> dict[tuple[str, str], dict[int, dict]]:
    """Per (defence, attack), each sample's record by its index."""
    by_pair: dict[tuple[str, str], dict[int, dict]] = {}
    for record in records:
        by_pair.setdefault((record["defense"], record["attack"]), {})[int(record["index"])] = record
    return by_pair


def sample_candidates(by_pair: dict[tuple[str, str], dict[int, dict]], defense: str,
                      attacks: list[AttackConfig]) -> dict[int, list[dict]]:
    """Per sample that every one of ``attacks`` has a record of, those records in cascade order:
    the candidates an attacker picks its submission from."""
    per_attack = [by_pair.get((defense, a.name), {}) for a in attacks]
    shared = set.intersection(*(set(o) for o in per_attack)) if per_attack else set()
    return {i: [records[i] for records in per_attack] for i in sorted(shared)}


def paired_comparisons(config: ExperimentConfig, by_pair: dict[tuple[str, str], dict[int, dict]]
                       ) -> list[dict]:
    """Each defence's paired difference from ``config.baseline`` on clean images and on each
    threat group's worst case (picked on selection draws), on the samples both have, under
    every scoring (percent points as fractions, with 95 % intervals): the comparison a claim
    "beats the baseline" needs. Each side's worst case is over the attacks that ran against it
    (``over``, ``baseline_over``): an attack defined for one defence only, such as a surrogate
    of its guidance, stays in."""
    if config.baseline is None:
        return []
    columns = {a.name: [a] for a in config.attacks if a.kind == "clean"} | worst_cases(config)
    comparisons = []
    for defense in (d.name for d in config.defenses if d.name != config.baseline):
        for column, group in columns.items():
            attacks = [group if len(group) == 1 else _attacking(group, name)  # a single attack (clean) as it is
                       for name in (defense, config.baseline)]
            sides = [{i: picked_outcome(c) for i, c in sample_candidates(by_pair, name, over).items()}
                     for name, over in zip((defense, config.baseline), attacks)]
            shared = sorted(set(sides[0]) & set(sides[1]))
            differences = {scoring: paired_difference([sides[0][i].by(scoring) - sides[1][i].by(scoring)
                                                       for i in shared]) for scoring in SCORINGS}
            comparisons.append({"defense": defense, "baseline": config.baseline, "column": column,
                                "total": len(shared), "over": [a.name for a in attacks[0]],
                                "baseline_over": [a.name for a in attacks[1]], **{
                                    scoring: {"mean": d.mean, "low": d.low, "high": d.high}
                                    for scoring, d in differences.items()}})
    return comparisons


def worst_cases(config: ExperimentConfig) -> dict[str, list[AttackConfig]]:
    """Threat groups: the attacks of one (norm, ε, fresh or frozen noise), with ``clean``
    required too (a sample wrong when clean is not robust). A sample counts as robust only if
    it survives every attack of its group, as AutoAttack reports its ensemble. Named
    ``worst-case``, or ``worst-case-<norm>-<ε>[-frozen]`` when there are several groups."""
    clean = [attack for attack in config.attacks if attack.kind == "clean"]
    groups: dict[tuple[str, float, bool], list[AttackConfig]] = {}
    for attack in config.attacks:
        if attack.kind != "clean":
            groups.setdefault(threat_group(attack), []).append(attack)
    groups = {key: clean + attacks for key, attacks in groups.items() if len(clean + attacks) > 1}
    if len(groups) == 1:
        return {"worst-case": next(iter(groups.values()))}
    return {f"worst-case-{norm}-{eps:g}{'-frozen' if frozen else ''}": attacks
            for (norm, eps, frozen), attacks in groups.items()}


def _row(config: ExperimentConfig, defense: DefenseConfig, attack: str, outcomes: list[Outcome],
         draws: int, threat: dict) -> dict:
    scored = {scoring: scored_accuracy(outcomes, scoring) for scoring in SCORINGS}
    headline = scored[config.evaluation.headline]
    row = {"defense": defense.name, "attack": attack, **threat, "purifier": defense.purifier,
           "draws": draws, "scoring": config.evaluation.headline,
           "correct": headline.correct, "total": headline.total,
           "accuracy": headline.value, "ci_low": headline.low, "ci_high": headline.high}
    for scoring, result in scored.items():
        row |= {f"{scoring}_accuracy": result.value, f"{scoring}_ci_low": result.low,
                f"{scoring}_ci_high": result.high}
    return {**row, "paper": config.paper.get(f"{defense.name}/{attack}")}


def interval_text(row: dict, scoring: str | None = None) -> str:
    """``76.6 [71.0, 81.3]`` (percent) for ``scoring``, the headline when None; ``-`` if empty."""
    prefix = "" if scoring is None else f"{scoring}_"
    if not row["total"]:
        return "-"
    return (f"{100 * row[prefix + 'accuracy']:.1f} [{100 * row[prefix + 'ci_low']:.1f}, "
            f"{100 * row[prefix + 'ci_high']:.1f}]")


def format_table(summary: dict) -> str:
    """A plain-text table of the summary for the terminal: every scoring, R, n, the paper."""
    scorings = "".join(f"{SCORING_LABELS[s] + ' % [95% CI]':<26}" for s in SCORINGS)
    lines = [f"{'defence':<24} {'attack':<28} {scorings} {'R':>3} {'n':>5}  paper"]
    for row in summary["rows"]:
        cells = "".join(f"{interval_text(row, s):<26}" for s in SCORINGS)
        paper = "" if row["paper"] is None else f"{row['paper']}"
        lines.append(f"{row['defense']:<24} {row['attack']:<28} {cells} {row['draws']:>3} "
                     f"{row['total']:>5}  {paper}")
    lines.append(f"R scoring draws per example (fresh noise no attacker saw); headline scoring: "
                 f"{SCORING_LABELS[summary['scoring']]}")
    cascade = summary.get("cascade") or {}
    if cascade.get("enabled"):
        lines.append(f"cascade: skipped {cascade['skipped']} of {cascade['records']} records already broken "
                     f"by an earlier attack ({100 * cascade['saved_fraction']:.0f} % of purifier passes saved)")
    return "\n".join(lines)
