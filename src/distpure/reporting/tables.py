"""The report's tables, one function per section, each returning its Markdown lines (empty
where the run has nothing to show): accuracy, at a glance, trade-off, paired differences,
cascade, time, convergence, warnings and every result in long form."""
from __future__ import annotations

from ..evaluation.convergence import MIN_SAMPLES, TOLERANCE, UPPER_TOLERANCE, convergence
from ..attacks.suite import AttackConfig
from ..evaluation.config import ExperimentConfig
from ..evaluation.protocol import SCORINGS, outcome, scored_accuracy, threat_group
from ..evaluation.resolved import record_stamp
from ..evaluation.rundir import RunDirectory
from ..evaluation.stats import Difference
from ..evaluation.summary import SCORING_LABELS, interval_text, resubmission_name, worst_cases
from ..evaluation.timing import duration, time_summary
from .markdown import (NORM_LABELS, format_eps, format_number, group_key, settings_text, table,
                       threat_label, worst_case_titles)
from .pareto import dominated, pareto_points
from .run import Run


CSV_FILE = RunDirectory(".").csv.name
SCORING_MEANINGS = {
    "expected": "the fraction of the R draws that classify the example right, averaged over samples",
    "worst": "right in all R draws (an attacker who may resubmit an example R times)",
    "majority": "the class most of the R draws predict is right (ties count as wrong)",
}


def accuracy_lines(run: Run) -> list[str]:
    """*Accuracy*: one table per threat group, its attacks as rows in the order listed (the
    cascade's), then its worst case, and the defences as columns; each cell holds the three
    scorings (their intervals are in *All results*, the wide form in the CSV)."""
    config = run.config
    paper = any(r["paper"] is not None for r in run.rows)
    lines = ["## Accuracy", "",
             f"Every example is classified by R = {config.evaluation.draws} purifications whose noise "
             "no attacker saw (deterministic defences: one; frozen-noise attacks: the attacker's own "
             "fixed draw, the threat model they stand for), and scored three ways. The worst case of a "
             "threat group is one submission per sample: the candidate (clean or an attack's example) "
             f"with the lowest accuracy on the attacker's own {config.evaluation.selection_draws} selection "
             "draws (runs from before selection draws: the first half of the R draws), scored on draws "
             "that did not pick it. The resubmission row is right in every draw of every attack (K x R "
             "submissions). Each cell gives "
             f"{' / '.join(SCORING_LABELS[s] for s in SCORINGS)} accuracy in % over n = {run.samples} "
             f"samples (the headline is {SCORING_LABELS[config.evaluation.headline]})"
             + ("; in parentheses the accuracy reported in the paper" if paper else "")
             + ". Their 95 % intervals are in *All results* below.", "",
             *(f"- {SCORING_LABELS[s].capitalize()}: {SCORING_MEANINGS[s]}." for s in SCORINGS), ""]
    names = [d.name for d in config.defenses]
    for heading, rows in _threat_tables(config):
        cells = [[label, *(_accuracy_cell(run.row(defense, name)) for defense in names)] for label, name in rows]
        lines += [f"### {heading}", "", *table(["attack", *names], cells, ["---", *[":---:"] * len(names)]), ""]
    return lines


def _threat_tables(config: ExperimentConfig) -> list[tuple[str, list[tuple[str, str]]]]:
    """(heading, [(row label, summary row name)]) per threat group, in the order the groups
    first appear: clean, the group's attacks as listed, then its worst case; clean alone when
    the experiment has no attack."""
    clean = [a.name for a in config.attacks if a.kind == "clean"]
    groups: dict[tuple[str, float, bool], list[str]] = {}
    for attack in config.attacks:
        if attack.kind != "clean":
            groups.setdefault(threat_group(attack), []).append(attack.name)
    worst = {group_key(group): name for name, group in worst_cases(config).items()}
    tables = []
    for key, attacks in groups.items():
        label = threat_label(*key)
        rows = [(name, name) for name in clean + attacks]
        tables.append((label, rows + ([(f"worst case, {label}", worst[key]),
                                       (f"resubmission, {label}", resubmission_name(worst[key]))]
                                      if key in worst else [])))
    return tables or [("clean", [(name, name) for name in clean])]


def _accuracy_cell(row: dict) -> str:
    """The three scorings of one (defence, attack), and the paper's figure where there is one."""
    return _scorings_cell(row) + (f" ({format_number(row['paper'])})" if row["paper"] is not None else "")


def selection_lines(run: Run) -> list[str]:
    """*Selection draws*: each worst case's expected accuracy as the attacker picks on more of
    its own draws; a figure still falling at the right end has not settled."""
    sweep = run.summary.get("selection_sweep") or []
    if not sweep:
        return []
    counts = sorted({entry["selection_draws"] for entry in sweep})
    cells: dict[tuple[str, str], dict[int, str]] = {}
    for entry in sweep:
        cells.setdefault((entry["defense"], entry["column"]), {})[entry["selection_draws"]] = \
            f"{100 * entry['accuracy']:.1f}"
    groups = {name: threat_label(*group_key(group)) for name, group in worst_cases(run.config).items()}
    rows = [[defense, groups.get(column, column), *(by.get(n, "–") for n in counts)]
            for (defense, column), by in cells.items()]
    return ["### Worst case by the attacker's selection draws (expected %)", "",
            "Per sample the attacker submits the candidate with the lowest accuracy on its first k "
            "selection draws; the picked example is scored on the draws that did not pick it. More "
            "draws make a stronger attacker; where the figure still falls at the largest k it has not "
            "settled.", "", *table(["defence", "threat", *(f"k = {n}" for n in counts)], rows), ""]


def glance_lines(run: Run) -> list[str]:
    """The table to paste into a paper: per defence, clean and each threat group's worst case
    under the three scorings, and the group's single strongest attack by the headline (marked
    where the report finds it not converged)."""
    groups = worst_cases(run.config)
    clean = [a.name for a in run.config.attacks if a.kind == "clean"]
    status = {(c.owner, c.attack): c.status for c in convergence(run.traces, run.records, run.config)}
    rows = []
    for defense in run.config.defenses:
        cells = [_scorings_cell(run.row(defense.name, name)) for name in clean]
        for name, group in groups.items():
            attacked = [run.row(defense.name, a.name) for a in group
                        if a.kind != "clean" and a.applies_to(defense.name)]
            strongest = min((r for r in attacked if r["total"]), key=lambda r: r["accuracy"], default=None)
            cells += [_scorings_cell(run.row(defense.name, name)),
                      "–" if strongest is None else f"{strongest['attack']} ({100 * strongest['accuracy']:.1f})"
                      + _status_mark(status.get((defense.name, strongest["attack"])))]
        rows.append([defense.name, *cells])
    labels = [threat_label(*group_key(group)) for group in groups.values()]
    header = ["defence", *clean, *(h for label in labels for h in (f"worst case, {label}", f"strongest, {label}"))]
    cascade = (" Under the cascade an attack's column also counts the samples earlier attacks of "
               "its group broke in every draw, so this is the attack that finished the job, not one "
               "that did it alone." if run.config.evaluation.cascade else "")
    return [f"### At a glance: {' / '.join(SCORING_LABELS[s] for s in SCORINGS)} (%)", "",
            "The worst case per sample over each threat group's attacks (clean included), and the "
            f"attack with the lowest {SCORING_LABELS[run.config.evaluation.headline]} accuracy." + cascade, "",
            *table(header, rows), ""]


def _scorings_cell(row: dict) -> str:
    """``75.4 / 53.1 / 75.0``: the three scorings of one row, or – where it has no samples."""
    if not row["total"]:
        return "–"
    return " / ".join(f"{100 * row[f'{s}_accuracy']:.1f}" for s in SCORINGS)


def pareto_lines(run: Run) -> list[str]:
    """The trade-off the paper is about, as a table per threat group: clean against worst-case
    accuracy and cost, each defence marked on or off the Pareto front."""
    lines = []
    for group, points in pareto_points(run).items():
        rows = [[name, f"{clean:.1f}", f"{robust:.1f}", "–" if cost is None else cost,
                 "dominated" if dominated((name, clean, robust, cost), points) else "**front**"]
                for name, clean, robust, cost in points]
        title = worst_case_titles(run.config)[group]
        lines += [f"### Trade-off: clean vs {title} ({SCORING_LABELS[run.config.evaluation.headline]})", "",
                  *table(["defence", "clean %", "worst case %", "denoiser calls / image", "Pareto"], rows), ""]
    return lines


def comparison_lines(run: Run) -> list[str]:
    """Each defence against the config's baseline, paired on the same samples, per scoring."""
    comparisons = run.summary["comparisons"]
    if not comparisons:
        return []
    baseline = run.config.baseline
    rows = [[c["defense"], c["column"], c["total"],
             *(str(Difference(**c[s], total=c["total"])) if c["total"] else "–" for s in SCORINGS),
             run.cost.get(c["defense"], "–")] for c in comparisons]
    uneven = [f"- {c['defense']} / {c['column']}: only against {c['defense']}: "
              f"{', '.join(a for a in c['over'] if a not in c['baseline_over']) or 'none'}; only against "
              f"{baseline}: {', '.join(a for a in c['baseline_over'] if a not in c['over']) or 'none'}"
              for c in comparisons if set(c["over"]) != set(c["baseline_over"]) and c["total"]]
    return [f"### Paired differences against {baseline}", "",
            f"Per sample, a defence's score minus {baseline}'s on the same image (clean, or the worst "
            "case of a threat group), averaged over the samples both have, in points, with a 95 % "
            "normal interval: an interval that excludes 0 is a difference the sample shows.", "",
            *table(["defence", "against", "n", *(f"{SCORING_LABELS[s]} Δ" for s in SCORINGS),
                     "denoiser calls / image"], rows), "",
            *(["Each worst case is over the attacks that ran against that defence; these differ:", "",
               *uneven, ""] if uneven else [])]


def cascade_lines(run: Run) -> list[str]:
    """What the cascade skipped per attack, and the share of purifier passes it saved."""
    cascade = run.summary["cascade"]
    if not cascade["enabled"]:
        return []
    skipped = [f"{r['defense']} / {r['attack']}: {r['skipped']} of {r['total']}"
               for r in run.rows if r.get("skipped")]
    return ["### Cascade", "",
            "Within a threat group each attack attacked only the samples no earlier attack (nor "
            "clean) had broken in every scoring draw; a skipped sample counts as broken by "
            "the earlier attack (so an attack's column counts those as broken too; the per-sample "
            "minimum over the group is the worst-case column, unchanged by the cascade). Skipped "
            f"{cascade['skipped']} of {cascade['records']} (sample, defence, attack) records, "
            f"{100 * cascade['saved_fraction']:.0f} % of the purifier passes (gradient passes and "
            "scoring draws, each counted once)" + (": " + "; ".join(skipped) if skipped else "") + ".", ""]


def time_lines(run: Run) -> list[str]:
    """Where the timed units' time went, per (defence, attack), and about what the cascade saved."""
    timed = time_summary(run.timings)
    if not timed["units"]:
        return []
    rows = [[p["defense"], p["attack"], p["units"], p["attacked"], duration(p["seconds"]),
             "–" if p["seconds_per_attacked_sample"] is None else f"{p['seconds_per_attacked_sample']:.1f}"]
            for p in sorted(timed["pairs"], key=lambda p: -p["seconds"])]
    saving = (f"; attacking every sample of these units (no cascade) would have taken about "
              f"{duration(timed['seconds_without_cascade'])} at each pair's cost per attacked sample"
              if run.config.evaluation.cascade else "")
    return ["### Time", "",
            f"{timed['units']} (batch, defence, attack) units timed, {duration(timed['seconds'])} of "
            "process time in all (each unit runs in one process; warm-start sources it had to "
            "craft included, so the first defence behind a victim pays for the batch's shared "
            "transfer examples; a unit cut by a stopped session is not counted)"
            f"{saving}.", "",
            *table(["defence", "attack", "units", "samples attacked", "process time", "s per attacked sample"],
                    rows), ""]


def convergence_lines(run: Run) -> list[str]:
    """Per iterative attack: each convergence measure it has, and whether it still gained at its
    end (then its numbers are upper bounds), decided by the strongest measure."""
    found = convergence(run.traces, run.records, run.config)
    if not found:
        return []

    rows = [[item.owner, item.attack,
             "–" if item.curve is None else f"{item.curve.steps[-1]} / {item.curve.samples}",
             "–" if item.curve is None else f"{100 * item.curve.accuracy[-1]:.1f}",
             "–" if item.curve is None else f"{100 * item.curve.late_drop:+.1f} ± {100 * item.curve.late_drop_error:.1f}",
             _fall_text(item.scored_fall),
             "–" if item.continuation is None else f"{item.continuation.attack}: {_fall_text(item.continuation.gain)}",
             (item.status if item.status != "not converged" else "**not converged**") + f" ({item.basis})"] for item in found]
    return ["### Convergence", "",
            "What more attacking would still gain, in points of expected accuracy over the samples "
            f"the attack attacked. An attack is converged when each scored measure falls by at most "
            f"{100 * TOLERANCE:.0f} point on average with its 95 % interval below {100 * UPPER_TOLERANCE:.0f} "
            f"points, on at least {MIN_SAMPLES} samples; **not converged** otherwise (its robust "
            "accuracy is an upper bound); not judged on fewer samples. The scored measures decide where "
            "the attack has one (both must pass), else its own draws (in brackets: which "
            "decided). *Scored fall over the last quarter*: the R scoring draws classify both the "
            "final examples and what the attack had kept at the start of its last quarter. "
            "*Continued by*: a later attack of the same kind and threat started from this one's "
            "examples; the fall of its scoring draws' accuracy from those examples to its own "
            "(the largest, if several). Both are paired on the same draws, with 95 % intervals, "
            "and exist only for units run since distpure records them (n says how many samples). "
            "*Own draws*: the final iterate's accuracy on the attacker's own EOT draws and its "
            "fall over the last quarter (the least-squares line ± its standard error); it judges "
            "the current iterate on a few noisy draws and cannot see what keeping each sample's "
            "best iterate gains.", "",
            *table(["defence (or victim)", "attack", "iterations / samples traced", "own-draw accuracy %",
                     "own-draw fall over last quarter", "scored fall over last quarter",
                     "continued by: scored fall", "status (measure)"], rows), ""]


def _fall_text(fall: Difference | None) -> str:
    """A scored fall in points with its interval and sample count, or a dash."""
    return "–" if fall is None else f"{fall} (n = {fall.total})"


def warning_lines(run: Run) -> list[str]:
    """What the attacks warned about (AutoAttack's messages), each once per defence and attack."""
    if not run.warnings:
        return []
    unique = dict.fromkeys((w["defense"], w["attack"], w["message"]) for w in run.warnings)
    return ["### Warnings from the attacks", "",
            *(f"- {defense} / {attack}: {message}" for defense, attack, message in unique), ""]


def stamp_lines(run: Run) -> list[str]:
    """*Records by scoring code*: a run resumed by another distpure version or at another resolved
    precision (``evaluate --new-resumption``) pools both in the tables above; here each stamp's
    records are scored alone, so a reader sees whether the two agree."""
    by_stamp: dict[tuple[str, str], dict[tuple[str, str], list[dict]]] = {}
    for record in run.records:
        stamp = record_stamp(record, run.legacy_stamp)
        by_stamp.setdefault(stamp, {}).setdefault((record["defense"], record["attack"]), []).append(record)
    if len(by_stamp) < 2:
        return []
    stamps = sorted(by_stamp)
    pairs = [(d.name, a.name) for d in run.config.defenses for a in run.config.attacks
             if any((d.name, a.name) in by_stamp[stamp] for stamp in stamps)]
    rows = [[defense, attack, *(_stamp_cell(by_stamp[stamp].get((defense, attack), [])) for stamp in stamps)]
            for defense, attack in pairs]
    return ["### Records by scoring code", "",
            f"This run holds records of {len(stamps)} (distpure version, resolved precision) stamps "
            "(resumed with `--new-resumption`); the tables above pool them. Each stamp's records alone, "
            f"{SCORING_LABELS['expected']} accuracy in % [95 % interval] (n records):", "",
            *table(["defence", "attack", *(f"distpure {version} at {precision}" for version, precision in stamps)],
                   rows), ""]


def _stamp_cell(records: list[dict]) -> str:
    """One stamp's records of one (defence, attack): expected accuracy, its interval, how many."""
    if not records:
        return "–"
    return f"{scored_accuracy([outcome(r) for r in records], 'expected')} (n = {len(records)})"


def all_results_lines(run: Run) -> list[str]:
    """*All results*: every (defence, attack) row in long form, with its threat model, the
    defence's settings and every scoring, and a link to the CSV."""
    long_rows = [[r["defense"], r["attack"], r["kind"], NORM_LABELS.get(r["norm"], r["norm"]),
                  format_eps(r["eps"], r["norm"]) if r["kind"] != "clean" else "–",
                  r["steps"] if r["kind"] not in ("clean", "worst-case") else "–", r["eot"],
                  "frozen" if r.get("frozen_noise") else "fresh",
                  settings_text(run.settings[r["defense"]], run.defenses[r["defense"]]),
                  r["draws"], r["total"], *(interval_text(r, s) for s in SCORINGS),
                  format_number(r["paper"])] for r in run.rows]
    return ["", "## All results", "",
            *table(["defence", "attack", "kind", "norm", "ε", "steps", "EOT", "noise",
                    "defence settings", "R", "n", *(f"{SCORING_LABELS[s]} %" for s in SCORINGS),
                    "paper %"], long_rows), "",
            f"Machine-readable: [{CSV_FILE}]({CSV_FILE}).", ""]


def _status_mark(status: str | None) -> str:
    """What the glance table adds after an attack that is not known to be converged."""
    return {"not converged": ", **not converged**", "not judged": ", not judged"}.get(status or "", "")
