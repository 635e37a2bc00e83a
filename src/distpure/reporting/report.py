"""The report of a run directory: ``report.md``, ``results.csv``, accuracy plots and image grids.

Everything is recomputed from ``config.yaml`` and the records (``results.jsonl``, plus any
per-rank files of a sharded run still in progress), so a report can be written at any time,
also for a partial run. Plots are drawn only along axes the experiment actually varies:

* accuracy vs ε, for attacks that differ only in ``eps`` (one line per defence);
* accuracy vs t*, vs the number of reverse steps and vs the guidance scale, for purifier
  defences that differ only in that setting (one line per attack).

Error bars and table intervals are 95 % Wilson score intervals.
"""
from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from ..devices import describe_hardware
from ..evaluation.config import DefenseConfig, ExperimentConfig, load_experiment
from ..evaluation.convergence import MIN_SAMPLES, TOLERANCE, UPPER_TOLERANCE, Curve, convergence, convergence_summary, curves
from ..evaluation.protocol import SCORINGS
from ..evaluation.rundir import RunDirectory
from ..evaluation.stats import Difference
from ..evaluation.summary import SCORING_LABELS, interval_text, summarize, worst_cases
from ..evaluation.timing import time_summary

CSV_FILE = RunDirectory(".").csv.name
SCORING_MEANINGS = {
    "expected": "the fraction of the R draws that classify the example right, averaged over samples",
    "worst": "right in all R draws (an attacker who may resubmit an example R times)",
    "majority": "the class most of the R draws predict is right (ties count as wrong)",
}
PURIFIER_COLUMNS = ("t_star", "num_steps", "victim_scale", "guidance")
# purifier setting -> axis label of its accuracy plot (file plots/accuracy_vs_<setting>.png)
PURIFIER_SWEEPS = {"t_star": "t*", "num_steps": "number of reverse steps",
                   "victim_scale": "guidance scale"}
NORM_LABELS = {"linf": "L∞", "l2": "L2"}


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md``, ``results.csv``, ``plots/*.png`` into ``run_dir``; return report.md."""
    files = RunDirectory(run_dir)
    run = _Run.load(files)
    _empty_plot_folder(files.plots)
    _write_csv(run, files.csv)
    plots = [*_accuracy_plots(run, files.plots), *_convergence_plots(run, files.plots)]
    grids = [_image_grid(path, files.plots / f"grid_{path.stem}.png")
             for path in sorted(files.examples.glob("*.safetensors"))]
    files.report.write_text(_markdown(run, plots, [g for g in grids if g is not None], files.root))
    return files.report


def _empty_plot_folder(plot_dir: Path) -> None:
    """Create ``plot_dir`` or delete its images, so no plot of a dropped row or attack outlives it."""
    plot_dir.mkdir(exist_ok=True)
    for image in plot_dir.glob("*.png"):
        image.unlink()


def summary_json(run_dir: str | Path) -> dict:
    """The recomputed summary with the run's metadata, as JSON-ready data (NaN -> null)."""
    run = _Run.load(RunDirectory(run_dir))
    return _json_ready({**run.summary, "run_dir": str(run_dir), "finished": run.finished,
                        "samples": run.samples, "samples_per_class": run.samples_per_class,
                        "records": len(run.records), "metadata": run.metadata,
                        "warnings": run.warnings, "convergence": convergence_summary(run.traces, run.records, run.config),
                        "time": time_summary(run.timings) if run.timings else None})


class _Run:
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
        self.summary = summarize(records, config)
        self.samples = len({r["index"] for r in records})
        self.samples_per_class = _samples_per_class(records)
        self.defenses = {d.name: d for d in config.defenses}
        self.cost = {name: cost["denoiser_calls"] for name, cost in (resolved or {}).get("cost", {}).items()}
        stored = (resolved or {}).get("settings", {}).get("defenses", {})
        self.settings = {d.name: _purifier_settings(d, config, stored.get(d.name)) for d in config.defenses}

    @classmethod
    def load(cls, files: RunDirectory) -> "_Run":
        if not files.config.is_file():
            raise FileNotFoundError(f"{files.root}: not a run directory (no config.yaml)")
        resolved = json.loads(files.resolved.read_text()) if files.resolved.is_file() else None
        run = cls(load_experiment(files.config), files.records(), files.read_metadata(), files.finished,
                  resolved, files.read_warnings(), files.read_traces(), files.read_timings())
        run.sessions = files.read_sessions()
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


# ----------------------------------------------------------------------------- formatting

def _format_number(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _format_eps(eps: float, norm: str) -> str:
    """8/255 rather than 0.0313725 when ε is a whole number of grey levels."""
    levels = eps * 255
    if norm == "linf" and eps > 0 and abs(levels - round(levels)) < 1e-6:
        return f"{round(levels)}/255"
    return f"{eps:g}"


def _threat_model(row: dict) -> str:
    if row["kind"] == "clean":
        return "clean"
    norm = NORM_LABELS.get(row["norm"], row["norm"])
    text = f"{row['kind']} {norm} ε={_format_eps(row['eps'], row['norm'])}"
    if row["kind"] != "autoattack":
        text += f", {_plural(row['steps'], 'step')}"
    return text + (f", EOT {row['eot']}" if row["eot"] > 1 else "")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _cell(text: object) -> str:
    """Markdown table cell text (pipes escaped, no line breaks)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[object]], align: list[str] | None = None) -> list[str]:
    align = align or ["---"] * len(header)
    return ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows)]


def _settings_text(settings: dict, spec: DefenseConfig) -> str:
    if spec.kind == "purifier":
        text = ", ".join(f"{key}={_format_number(settings.get(key))}" for key in PURIFIER_COLUMNS
                         if key in settings)
        extra = {k: v for k, v in spec.purifier.items() if k not in PURIFIER_COLUMNS}
        text += "".join(f", {key}={_format_number(value)}" for key, value in sorted(extra.items()))
        text += f", diffusion={spec.diffusion}" if spec.diffusion else ""
    elif spec.kind == "preprocessing":
        text = ", ".join(f"{key}={value}" for key, value in spec.preprocessing.items())
    elif spec.kind == "classifier":
        text = str(spec.classifier)
    else:
        text = "no defence"
    return text + (f", votes={spec.votes}" if spec.votes > 1 else "")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d} (h:mm:ss)"


def _hardware_line(meta: dict) -> str:
    """Device, model and resolved precision; runs from before precision was resolved stored
    only the device and its name."""
    if "hardware" in meta:
        return describe_hardware(meta["hardware"])
    return f"{meta.get('device', 'unknown')} ({meta.get('device_name', 'unknown model')}), precision not recorded"


def _session_lines(sessions: list[dict]) -> list[str]:
    """When a run was resumed on other hardware (or another precision resolved), say so."""
    machines = list(dict.fromkeys(describe_hardware(s["hardware"]) for s in sessions))
    if len(machines) < 2:
        return []
    return [f"- sessions: {len(sessions)}, on {len(machines)} hardware configurations: " + "; ".join(machines)]


def _samples_per_class(records: list[dict]) -> dict[int, int]:
    """How many distinct samples of each label the records cover, by label: the class balance
    of the sample, which for a partial run is whatever prefix of the evaluation order is done."""
    labels = {r["index"]: int(r["label"]) for r in records}
    return dict(sorted(Counter(labels.values()).items()))


def _class_counts_text(counts: dict[int, int]) -> str:
    """``0: 5, 3: 2`` (labels in the dataset's class order; absent labels have no samples)."""
    return ", ".join(f"{label}: {count}" for label, count in counts.items()) or "none"


def _order_warning(records: list[dict]) -> str:
    """For records written before evaluation order was randomised (no ``dataset_index``): their
    prefix of a run followed class order, so a partial run's classes are not a fair sample."""
    if all("dataset_index" in r for r in records):
        return ""
    return (" These records were written in class order (before evaluation order was "
            "randomised), so they over-represent the first classes.")


def _markdown(run: _Run, plots: list[tuple[str, Path]], grids: list[Path], run_dir: Path) -> str:
    config = run.config
    # a partial run has no (or an earlier, extended run's) metadata: its latest session stands in
    latest = {key: run.sessions[-1][key] for key in ("hardware", "processes")} if run.sessions else {}
    meta = {**latest, **run.metadata} if run.finished else {**run.metadata, **latest}
    lines = [f"# {config.name}", ""]
    if config.description:
        lines += [config.description.strip(), ""]
    if not run.finished:
        lines += ["> **Partial run**: the evaluation has not finished; numbers cover the records "
                  "written so far (see *samples per class* below)." + _order_warning(run.records), ""]
    packages = meta.get("packages") or {}
    data = config.data
    lines += ["## Run", "",
              f"- commit: `{meta.get('git_commit') or 'unknown'}`",
              f"- hardware: {_hardware_line(meta)}; processes: {meta.get('processes', 1)}",
              *_session_lines(run.sessions),
              f"- packages: python {meta.get('python', 'unknown')}, " +
              ", ".join(f"{name} {version}" for name, version in packages.items() if version),
              f"- wall time: {_duration(meta.get('wall_time_seconds'))}",
              f"- seed: {config.seed} (data subset seed {data.seed})",
              f"- samples: {run.samples} ({data.dataset} {data.split}, limit {data.limit}); "
              f"batch size {config.batch_size}",
              f"- samples per class (label: count): {_class_counts_text(run.samples_per_class)}",
              f"- models: victim `{config.models.victim}`, diffusion "
              + (", ".join(f"`{name}`" for name in sorted({s["diffusion"] for s in run.settings.values() if s}))
                 or "none"), ""]

    attacks = [a.name for a in config.attacks] + list(worst_cases(config))
    draws = config.evaluation.draws
    lines += ["## Accuracy", "",
              f"Every example is classified by R = {draws} purifications whose noise no attacker "
              "saw (deterministic defences: one; frozen-noise attacks: the attacker's own fixed "
              "draw, the threat model they stand for), and scored three ways; the worst case is taken "
              "per sample over the attacks of one threat group, clean included. 95 % intervals "
              f"(Wilson; a normal interval for expected accuracy over several draws) over "
              f"n = {run.samples} samples" + ("; in parentheses the accuracy reported in the paper."
                                             if any(r["paper"] is not None for r in run.rows) else "."), ""]
    order = [config.evaluation.headline, *(s for s in SCORINGS if s != config.evaluation.headline)]
    for scoring in order:
        table_rows = [[d.name, *(_main_cell(run.row(d.name, a), scoring) for a in attacks)]
                      for d in config.defenses]
        lines += [f"### {SCORING_LABELS[scoring]}" + (" (headline)" if scoring == order[0] else ""), "",
                  f"{SCORING_LABELS[scoring].capitalize()}: {SCORING_MEANINGS[scoring]}.", "",
                  *_table(["defence", *attacks], table_rows, ["---", *[":---:"] * len(attacks)]), ""]
    lines += _glance_lines(run)
    lines += _pareto_lines(run)
    lines += _comparison_lines(run)
    lines += _cascade_lines(run)
    lines += _time_lines(run)
    lines += _convergence_lines(run)
    if run.warnings:
        lines += ["### Warnings from the attacks", ""]
        unique = dict.fromkeys((w["defense"], w["attack"], w["message"]) for w in run.warnings)
        lines += [f"- {defense} / {attack}: {message}" for defense, attack, message in unique]
        lines += [""]

    lines += ["### Defences", ""]
    lines += [f"- **{d.name}** ({d.kind}): {_settings_text(run.settings[d.name], d)}"
              for d in config.defenses]
    lines += ["", "### Attacks", ""]
    lines += [f"- **{a.name}**: {_threat_model(run.row(config.defenses[0].name, a.name))}"
              for a in config.attacks]
    lines += [f"- **{name}**: per sample, robust only if it survives every one of "
              f"{', '.join(a.name for a in group)}" for name, group in worst_cases(config).items()]

    long_rows = [[r["defense"], r["attack"], r["kind"], NORM_LABELS.get(r["norm"], r["norm"]),
                  _format_eps(r["eps"], r["norm"]) if r["kind"] != "clean" else "–",
                  r["steps"] if r["kind"] not in ("clean", "worst-case") else "–", r["eot"],
                  "frozen" if r.get("frozen_noise") else "fresh",
                  _settings_text(run.settings[r["defense"]], run.defenses[r["defense"]]),
                  r["draws"], r["total"], *(interval_text(r, s) for s in SCORINGS),
                  _format_number(r["paper"])] for r in run.rows]
    lines += ["", "## All results", "",
              *_table(["defence", "attack", "kind", "norm", "ε", "steps", "EOT", "noise",
                       "defence settings", "R", "n", *(f"{SCORING_LABELS[s]} %" for s in SCORINGS),
                       "paper %"], long_rows), "",
              f"Machine-readable: [{CSV_FILE}]({CSV_FILE}).", ""]

    if plots:
        lines += ["## Plots", ""]
        for title, path in plots:
            relative = path.relative_to(run_dir).as_posix()
            lines += [f"### {title}", "", f"![{title}]({relative})", ""]
    if grids:
        lines += ["## Examples", "",
                  "Rows: clean, adversarial, purified, and |adversarial − clean| scaled per image "
                  "to fill [0, 1]. Taken from the first batch.", ""]
        for path in grids:
            defense, _, attack = path.stem[len("grid_"):].partition("__")
            relative = path.relative_to(run_dir).as_posix()
            lines += [f"### {defense} / {attack}", "", f"![{defense} / {attack}]({relative})", ""]
    return "\n".join(lines)


def _main_cell(row: dict, scoring: str) -> str:
    text = interval_text(row, scoring) if row["total"] else "–"
    return text + (f" ({_format_number(row['paper'])})" if row["paper"] is not None else "")


# ----------------------------------------------------------------------------- CSV

def _write_csv(run: _Run, path: Path) -> None:
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


# ----------------------------------------------------------------------------- plots

def _new_figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _error_bars(axes, xs: list[float], rows: list[dict], label: str) -> None:
    ys = [100 * r["accuracy"] for r in rows]
    # max(0, ...): at 100 % the Wilson bound can round to 0.9999999999999999
    below = [max(0.0, 100 * (r["accuracy"] - r["ci_low"])) for r in rows]
    above = [max(0.0, 100 * (r["ci_high"] - r["accuracy"])) for r in rows]
    axes.errorbar(xs, ys, yerr=[below, above], marker="o", capsize=3, label=label)


def _finish_axes(axes, xlabel: str, title: str) -> None:
    ticks = sorted({float(x) for line in axes.get_lines() for x in line.get_xdata()})
    if 0 < len(ticks) <= 12:
        axes.set_xticks(ticks, [f"{x:g}" for x in ticks])
    axes.set_xlabel(xlabel)
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(-2, 102)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def _cascade_lines(run: _Run) -> list[str]:
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


def _time_lines(run: _Run) -> list[str]:
    """Where the timed units' time went, per (defence, attack), and about what the cascade saved."""
    timed = time_summary(run.timings)
    if not timed["units"]:
        return []
    rows = [[p["defense"], p["attack"], p["units"], p["attacked"], _duration(p["seconds"]),
             "–" if p["seconds_per_attacked_sample"] is None else f"{p['seconds_per_attacked_sample']:.1f}"]
            for p in sorted(timed["pairs"], key=lambda p: -p["seconds"])]
    saving = (f"; attacking every sample of these units (no cascade) would have taken about "
              f"{_duration(timed['seconds_without_cascade'])} at each pair's cost per attacked sample"
              if run.config.evaluation.cascade else "")
    return ["### Time", "",
            f"{timed['units']} (batch, defence, attack) units timed, {_duration(timed['seconds'])} of "
            "process time in all (each unit runs in one process; warm-start sources it had to "
            "craft included, so the first defence behind a victim pays for the batch's shared "
            "transfer examples; a unit cut by a stopped session is not counted)"
            f"{saving}.", "",
            *_table(["defence", "attack", "units", "samples attacked", "process time", "s per attacked sample"],
                    rows), ""]


def _convergence_lines(run: _Run) -> list[str]:
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
            f"accuracy is an upper bound); not judged on fewer samples. The scored measures decide where "
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
            *_table(["defence (or victim)", "attack", "iterations / samples traced", "own-draw accuracy %",
                     "own-draw fall over last quarter", "scored fall over last quarter",
                     "continued by: scored fall", "status (measure)"], rows), ""]


def _fall_text(fall: Difference | None) -> str:
    """A scored fall in points with its interval and sample count, or a dash."""
    return "–" if fall is None else f"{fall} (n = {fall.total})"


def _convergence_plots(run: _Run, plot_dir: Path) -> list[tuple[str, Path]]:
    """Accuracy on the attacker's own draws against iterations, one plot per attack."""
    by_attack: dict[str, list[Curve]] = {}
    for curve in curves(run.traces):
        by_attack.setdefault(curve.attack, []).append(curve)
    plots = []
    for attack, found in by_attack.items():
        figure = _new_figure((5.5, 4))
        axes = figure.subplots()
        for curve in found:
            axes.plot(curve.steps, [100 * a for a in curve.accuracy], marker=".", label=curve.owner)
        title = f"Convergence of {attack}"
        _finish_axes(axes, "iteration", title)
        path = plot_dir / f"convergence_{attack}.png"
        figure.savefig(path, dpi=120)
        plots.append((title, path))
    return plots


def _accuracy_plots(run: _Run, plot_dir: Path) -> list[tuple[str, Path]]:
    """Every applicable accuracy plot, as (title, path)."""
    return [*_sweep_plots(run, plot_dir, "eps"), *_sweep_plots(run, plot_dir, "eot"),
            *_purifier_plots(run, plot_dir), *_pareto_plots(run, plot_dir)]


def _pareto_points(run: _Run) -> dict[str, list[tuple[str, float, float, int | None]]]:
    """Per threat group's worst case: (defence, clean %, worst-case %, denoiser calls per image)
    under the headline scoring, for every defence with both measured."""
    clean = next((a.name for a in run.config.attacks if a.kind == "clean"), None)
    if clean is None:
        return {}
    points = {}
    for group in worst_cases(run.config):
        found = [(d.name, 100 * run.row(d.name, clean)["accuracy"], 100 * run.row(d.name, group)["accuracy"],
                  run.cost.get(d.name)) for d in run.config.defenses
                 if run.row(d.name, clean)["total"] and run.row(d.name, group)["total"]]
        if len(found) >= 2:
            points[group] = found
    return points


def _dominated(point: tuple[str, float, float, int | None], others: list) -> bool:
    """Whether another defence is at least as accurate clean and robust, at no more cost, and
    better in one of the three."""
    _, clean, robust, cost = point
    cost = cost if cost is not None else 0
    for _, c, r, k in others:
        k = k if k is not None else 0
        if c >= clean and r >= robust and k <= cost and (c, r, -k) != (clean, robust, -cost):
            return True
    return False


def _pareto_lines(run: _Run) -> list[str]:
    """The trade-off the paper is about, as a table per threat group: clean against worst-case
    accuracy and cost, each defence marked on or off the Pareto front."""
    lines = []
    for group, points in _pareto_points(run).items():
        rows = [[name, f"{clean:.1f}", f"{robust:.1f}", "–" if cost is None else cost,
                 "dominated" if _dominated((name, clean, robust, cost), points) else "**front**"]
                for name, clean, robust, cost in points]
        lines += [f"### Trade-off: clean vs {group} ({SCORING_LABELS[run.config.evaluation.headline]})", "",
                  *_table(["defence", "clean %", "worst case %", "denoiser calls / image", "Pareto"], rows), ""]
    return lines


def _status_mark(status: str | None) -> str:
    """What the glance table adds after an attack that is not known to be converged."""
    return {"not converged": ", **not converged**", "not judged": ", not judged"}.get(status or "", "")


def _glance_lines(run: _Run) -> list[str]:
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
    header = ["defence", *clean, *(h for name in groups for h in (name, f"strongest of {name}"))]
    cascade = (" Under the cascade an attack's column also counts the samples earlier attacks of "
               "its group broke in every draw, so this is the attack that finished the job, not one "
               "that did it alone." if run.config.evaluation.cascade else "")
    return [f"### At a glance: {' / '.join(SCORING_LABELS[s] for s in SCORINGS)} (%)", "",
            "The worst case per sample over each threat group's attacks (clean included), and the "
            f"attack with the lowest {SCORING_LABELS[run.config.evaluation.headline]} accuracy." + cascade, "",
            *_table(header, rows), ""]


def _scorings_cell(row: dict) -> str:
    """``75.4 / 53.1 / 75.0``: the three scorings of one row, or – where it has no samples."""
    if not row["total"]:
        return "–"
    return " / ".join(f"{100 * row[f'{s}_accuracy']:.1f}" for s in SCORINGS)


def _comparison_lines(run: _Run) -> list[str]:
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
            *_table(["defence", "against", "n", *(f"{SCORING_LABELS[s]} Δ" for s in SCORINGS),
                     "denoiser calls / image"], rows), "",
            *(["Each worst case is over the attacks that ran against that defence; these differ:", "",
               *uneven, ""] if uneven else [])]


def _pareto_plots(run: _Run, plot_dir: Path) -> list[tuple[str, Path]]:
    """Clean against worst-case accuracy, one marker per defence (its cost in the legend, as
    its size) and the Pareto front as a dashed line; the axes fit the points, which often lie
    within a few points of each other."""
    plots = []
    markers = "osD^vPX*<>ph"
    for group, points in _pareto_points(run).items():
        figure = _new_figure((6.5, 4.5))
        axes = figure.subplots()
        for index, (name, clean, robust, cost) in enumerate(points):
            axes.scatter([robust], [clean], s=30 + 3 * (cost or 0), alpha=0.8, marker=markers[index % len(markers)],
                         label=name + ("" if cost is None else f" ({cost} calls)"))
        front = sorted((point[2], point[1]) for point in points if not _dominated(point, points))
        axes.plot(*zip(*front), "k--", linewidth=0.8, label="Pareto front")
        for values, set_limits in (([p[2] for p in points], axes.set_xlim), ([p[1] for p in points], axes.set_ylim)):
            margin = max(2.0, 0.1 * (max(values) - min(values)))
            set_limits(max(-1.0, min(values) - margin), min(101.0, max(values) + margin))
        axes.set_xlabel(f"{group} accuracy (%)")
        axes.set_ylabel("clean accuracy (%)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.02, 0.5))
        title = f"Clean vs robust ({group}); legend: denoiser calls per image"
        axes.set_title(title, fontsize="medium")
        path = plot_dir / f"pareto_{group}.png"
        figure.savefig(path, dpi=120)
        plots.append((title, path))
    return plots


def _sweep_plots(run: _Run, plot_dir: Path, setting: str) -> list[tuple[str, Path]]:
    """Accuracy against ``setting`` (``eps`` or ``eot``) for each group of attacks identical but
    for it and their names (one line per defence): the ε ablation, and the EOT sweep that shows
    whether an attack's expectation has converged."""
    groups: dict[str, list] = {}
    for attack in run.config.attacks:
        if attack.kind != "clean":
            key = json.dumps({k: v for k, v in asdict(attack).items() if k not in ("name", setting)},
                             sort_keys=True, default=str)
            groups.setdefault(key, []).append(attack)
    value = (lambda a: a.eps) if setting == "eps" else (lambda a: a.eot_draws)  # noqa: E731
    plots, used = [], set()
    for attacks in groups.values():
        if len({value(a) for a in attacks}) < 2:
            continue
        attacks = sorted(attacks, key=value)
        first = attacks[0]
        stem = f"accuracy_vs_{setting}_{first.kind}_{first.norm}"
        name, counter = stem, 1
        while name in used:
            counter += 1
            name = f"{stem}_{counter}"
        used.add(name)
        scale = 255 if setting == "eps" and first.norm == "linf" else 1
        figure = _new_figure((5.5, 4))
        axes = figure.subplots()
        for defense in run.config.defenses:
            rows = [run.row(defense.name, a.name) for a in attacks]
            points = [(value(a) * scale, r) for a, r in zip(attacks, rows) if r["total"]]
            if points:
                _error_bars(axes, [x for x, _ in points], [r for _, r in points], defense.name)
        details = _plural(first.iterations, "step") if first.kind != "autoattack" else first.version
        if setting == "eps":
            details += f", EOT {first.eot_draws}" if first.eot_draws > 1 else ""
            title = f"Accuracy vs ε: {first.kind} {NORM_LABELS.get(first.norm, first.norm)} ({details})"
            xlabel = "ε (×1/255)" if scale == 255 else "ε"
        else:
            eps = _format_eps(first.eps, first.norm)
            title = f"Accuracy vs EOT: {first.kind} {NORM_LABELS.get(first.norm, first.norm)} ε={eps} ({details})"
            xlabel = "EOT draws per step"
        _finish_axes(axes, xlabel, title)
        path = plot_dir / f"{name}.png"
        figure.savefig(path, dpi=120)
        plots.append((title, path))
    return plots


def _purifier_plots(run: _Run, plot_dir: Path) -> list[tuple[str, Path]]:
    """Accuracy vs each purifier setting the experiment sweeps (one line per attack)."""
    plots = []
    for setting, axis_label in PURIFIER_SWEEPS.items():
        groups: dict[str, list[tuple[float, str]]] = {}
        for defense in run.config.defenses:
            settings = run.settings[defense.name]
            value = settings.get(setting)
            if defense.kind != "purifier" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if setting == "victim_scale" and "victim" not in str(settings.get("guidance", "")):
                continue
            rest = {k: v for k, v in settings.items() if k != setting}
            key = json.dumps({**rest, "votes": defense.votes}, sort_keys=True, default=str)
            groups.setdefault(key, []).append((value, defense.name))
        sweeps = {key: sorted(members) for key, members in groups.items()
                  if len({value for value, _ in members}) >= 2}
        if not sweeps:
            continue
        labels = _group_labels(list(sweeps))
        figure = _new_figure((5.5, 4))
        axes = figure.subplots()
        for key, members in sweeps.items():
            for attack in run.config.attacks:
                points = [(value, run.row(name, attack.name)) for value, name in members]
                points = [(x, r) for x, r in points if r["total"]]
                if points:
                    label = attack.name + (f" ({labels[key]})" if labels[key] else "")
                    _error_bars(axes, [x for x, _ in points], [r for _, r in points], label)
        title = f"Accuracy vs {axis_label}"
        _finish_axes(axes, axis_label, title)
        path = plot_dir / f"accuracy_vs_{setting}.png"
        figure.savefig(path, dpi=120)
        plots.append((title, path))
    return plots


def _group_labels(keys: list[str]) -> dict[str, str]:
    """For several sweeps on one plot, the settings that tell them apart."""
    decoded = {key: json.loads(key) for key in keys}
    names = sorted({name for values in decoded.values() for name in values})
    differing = [n for n in names
                 if len({json.dumps(v.get(n), sort_keys=True) for v in decoded.values()}) > 1]
    return {key: ", ".join(f"{n}={values.get(n)}" for n in differing) for key, values in decoded.items()}


# ----------------------------------------------------------------------------- image grids

def _image_grid(examples: Path, path: Path) -> Path | None:
    """Clean / adversarial / purified / amplified |adv − clean| rows of one example file."""
    import numpy as np
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(examples))
        clean, adversarial, purified = (tensors[key].float().cpu()
                                        for key in ("clean", "adversarial", "purified"))
    except (KeyError, OSError, ValueError, RuntimeError):
        return None
    if clean.ndim != 4 or len(clean) == 0:
        return None
    difference = (adversarial - clean).abs()
    peak = difference.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    difference = difference / peak
    rows = [("clean", clean), ("adversarial", adversarial), ("purified", purified),
            ("|adv − clean|\n(scaled)", difference)]

    def strip(images) -> "np.ndarray":
        images = images.clamp(0, 1)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        images = images[:, :3].permute(0, 2, 3, 1).numpy()
        gap = np.ones((images.shape[1], max(1, images.shape[2] // 16), 3), dtype=images.dtype)
        parts = []
        for image in images:
            parts += [image, gap]
        return np.concatenate(parts[:-1], axis=1)

    count = len(clean)
    figure = _new_figure((1.0 + 1.0 * count, 4.4))
    axes_list = figure.subplots(len(rows), 1)
    for axes, (label, images) in zip(axes_list, rows):
        axes.imshow(strip(images), interpolation="nearest")
        axes.set_xticks([])
        axes.set_yticks([])
        for spine in axes.spines.values():
            spine.set_visible(False)
        axes.set_ylabel(label, rotation=0, ha="right", va="center", fontsize="small")
    defense, _, attack = examples.stem.partition("__")
    figure.suptitle(f"{defense} / {attack}", fontsize="medium")
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


# ----------------------------------------------------------------------------- JSON

def _json_ready(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value
