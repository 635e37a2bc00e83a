"""The report of a run directory: ``report.md``, assembled from the sections of tables.py,
with ``results.csv``, plots and image grids beside it, and the JSON summary (``--json``).

Everything is recomputed from ``config.yaml`` and the records (``results.jsonl``, plus any
per-rank files of a sharded run still in progress), so a report can be written at any time,
also for a partial run. Table intervals are 95 % Wilson score intervals.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..devices import describe_hardware
from ..evaluation.convergence import convergence_summary
from ..evaluation.rundir import RESCORE, RunDirectory, evaluation_sessions
from ..evaluation.summary import worst_cases
from ..evaluation.timing import time_summary
from .grids import image_grid
from ..evaluation.timing import duration
from .markdown import settings_text, threat_model, victim_text
from .plots import accuracy_plots, convergence_plots
from .results_csv import write_csv
from .run import Run
from .tables import (accuracy_lines, all_results_lines, cascade_lines, comparison_lines, convergence_lines,
                     glance_lines, pareto_lines, selection_lines, stamp_lines, time_lines, warning_lines)


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md``, ``results.csv``, ``plots/*.png`` into ``run_dir``; return report.md."""
    files = RunDirectory(run_dir)
    run = Run.load(files)
    _empty_plot_folder(files.plots)
    write_csv(run, files.csv)
    plots = [*accuracy_plots(run, files.plots), *convergence_plots(run, files.plots)]
    grids = [image_grid(path, files.plots / f"grid_{path.stem}.png")
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
    run = Run.load(RunDirectory(run_dir))
    return json_ready({**run.summary, "run_dir": str(run_dir), "finished": run.finished,
                        "samples": run.samples, "samples_per_class": run.samples_per_class,
                        "records": len(run.records), "metadata": run.metadata,
                        "warnings": run.warnings, "convergence": convergence_summary(run.traces, run.records, run.config),
                        "time": time_summary(run.timings) if run.timings else None})


def _hardware_line(meta: dict) -> str:
    """Device, model and resolved precision; runs from before precision was resolved stored
    only the device and its name."""
    if "hardware" in meta:
        return describe_hardware(meta["hardware"])
    return f"{meta.get('device', 'unknown')} ({meta.get('device_name', 'unknown model')}), precision not recorded"


def _session_lines(sessions: list[dict]) -> list[str]:
    """When a run was resumed on other hardware (or another precision resolved), or its selection
    draws were added afterwards (``distpure rescore``), say so."""
    runs = evaluation_sessions(sessions)
    machines = list(dict.fromkeys(describe_hardware(s["hardware"]) for s in runs))
    lines = [f"- sessions: {len(runs)}, on {len(machines)} hardware configurations: " + "; ".join(machines)
             ] if len(machines) > 1 else []
    return lines + [_rescore_line(s) for s in sessions if RESCORE in s]


def _rescore_line(session: dict) -> str:
    """One ``distpure rescore`` session: its selection draws, version and hardware, and whether it
    drew them at another precision than the records' (those records name it)."""
    settings = session[RESCORE]
    other = (", at another precision than the records' (--any-precision; those records name it in "
             "selection_precision)") if settings["any_precision"] else ""
    return (f"- rescored ({session['started']}): {settings['selection_draws']} selection draws per example by "
            f"distpure {settings['distpure']}, {describe_hardware(session['hardware'])}{other}")


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


# The report's sections after its run description, in order: each takes the run and returns its
# Markdown lines (none where the run has nothing to show). A new section is one more function here.
SECTIONS = (accuracy_lines, selection_lines, glance_lines, pareto_lines, comparison_lines, cascade_lines, time_lines,
            convergence_lines, stamp_lines, warning_lines)


def _markdown(run: Run, plots: list[tuple[str, Path]], grids: list[Path], run_dir: Path) -> str:
    """The whole report.md: title and run description, the sections, what was run, every result,
    then the plots and example grids."""
    lines = _run_lines(run)
    for section in SECTIONS:
        lines += section(run)
    lines += _description_lines(run)
    lines += all_results_lines(run)
    lines += _figure_lines(plots, grids, run_dir)
    return "\n".join(lines)


def _run_lines(run: Run) -> list[str]:
    """Title, description, a partial run's warning and the *Run* section: commit, hardware,
    packages, time, seeds, samples and models."""
    config = run.config
    # a partial run has no (or an earlier, extended run's) metadata: its latest session stands in
    runs = evaluation_sessions(run.sessions)
    latest = {key: runs[-1][key] for key in ("hardware", "processes")} if runs else {}
    meta = {**latest, **run.metadata} if run.finished else {**run.metadata, **latest}
    lines = [f"# {config.name}", ""]
    if config.description:
        lines += [config.description.strip(), ""]
    if not run.finished:
        lines += ["> **Partial run**: the evaluation has not finished; numbers cover the records "
                  "written so far (see *samples per class* below)." + _order_warning(run.records), ""]
    packages = meta.get("packages") or {}
    data = config.data
    return lines + ["## Run", "",
                    f"- commit: `{meta.get('git_commit') or 'unknown'}`",
                    f"- hardware: {_hardware_line(meta)}; processes: {meta.get('processes', 1)}",
                    *_session_lines(run.sessions),
                    f"- packages: python {meta.get('python', 'unknown')}, " +
                    ", ".join(f"{name} {version}" for name, version in packages.items() if version),
                    f"- wall time: {duration(meta.get('wall_time_seconds'))}",
                    f"- seed: {config.seed} (data subset seed {data.seed})",
                    f"- samples: {run.samples} ({data.dataset} {data.split}, limit {data.limit}); "
                    f"batch size {config.batch_size}",
                    f"- samples per class (label: count): {_class_counts_text(run.samples_per_class)}",
                    f"- models: {victim_text(config.models)}, diffusion "
                    + (", ".join(f"`{name}`" for name in sorted({s["diffusion"] for s in run.settings.values() if s}))
                       or "none"), ""]


def _description_lines(run: Run) -> list[str]:
    """What ran: each defence with its settings, each attack's threat model, each worst case."""
    config = run.config
    return ["### Defences", "",
            *(f"- **{d.name}** ({d.kind}): {settings_text(run.settings[d.name], d)}" for d in config.defenses),
            "", "### Attacks", "",
            *(f"- **{a.name}**: {threat_model(run.row(config.defenses[0].name, a.name))}" for a in config.attacks),
            *(f"- **{name}**: per sample, robust only if it survives every one of "
              f"{', '.join(a.name for a in group)}" for name, group in worst_cases(config).items())]


def _figure_lines(plots: list[tuple[str, Path]], grids: list[Path], run_dir: Path) -> list[str]:
    """The *Plots* and *Examples* sections, linking the PNGs relative to the run directory."""
    lines = []
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
    return lines


def json_ready(value):
    """``value`` with every non-finite float as None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value
