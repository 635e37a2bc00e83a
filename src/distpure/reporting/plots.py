"""The report's plots: accuracy along every axis the experiment varies (ε, EOT, t*, reverse
steps, guidance scale), convergence per attack and the clean-vs-robust Pareto plot.

Plots are drawn only along axes the experiment actually varies: accuracy vs ε or EOT for
attacks that differ only in that (one line per defence); accuracy vs t*, the number of reverse
steps and the guidance scale for purifier defences that differ only in that setting (one line
per attack). Error bars are 95 % Wilson score intervals.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..evaluation.convergence import Curve, curves
from .markdown import NORM_LABELS, format_eps, plural, worst_case_titles
from .pareto import dominated, pareto_points
from .run import Run


PURIFIER_SWEEPS = {"t_star": "t*", "num_steps": "number of reverse steps",
                   "victim_scale": "guidance scale"}


def new_figure(size: tuple[float, float]):
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


def accuracy_plots(run: Run, plot_dir: Path) -> list[tuple[str, Path]]:
    """Every applicable accuracy plot, as (title, path)."""
    return [*_sweep_plots(run, plot_dir, "eps"), *_sweep_plots(run, plot_dir, "eot"),
            *_purifier_plots(run, plot_dir), *_pareto_plots(run, plot_dir)]


def convergence_plots(run: Run, plot_dir: Path) -> list[tuple[str, Path]]:
    """Accuracy on the attacker's own draws against iterations, one plot per attack."""
    by_attack: dict[str, list[Curve]] = {}
    for curve in curves(run.traces):
        by_attack.setdefault(curve.attack, []).append(curve)
    plots = []
    for attack, found in by_attack.items():
        figure = new_figure((5.5, 4))
        axes = figure.subplots()
        for curve in found:
            axes.plot(curve.steps, [100 * a for a in curve.accuracy], marker=".", label=curve.owner)
        title = f"Convergence of {attack}"
        _finish_axes(axes, "iteration", title)
        path = plot_dir / f"convergence_{attack}.png"
        figure.savefig(path, dpi=120)
        plots.append((title, path))
    return plots


def _pareto_plots(run: Run, plot_dir: Path) -> list[tuple[str, Path]]:
    """Clean against worst-case accuracy, one marker per defence (its cost in the legend, as
    its size) and the Pareto front as a dashed line; the axes fit the points, which often lie
    within a few points of each other."""
    plots = []
    markers = "osD^vPX*<>ph"
    for group, points in pareto_points(run).items():
        figure = new_figure((6.5, 4.5))
        axes = figure.subplots()
        for index, (name, clean, robust, cost) in enumerate(points):
            axes.scatter([robust], [clean], s=30 + 3 * (cost or 0), alpha=0.8, marker=markers[index % len(markers)],
                         label=name + ("" if cost is None else f" ({cost} calls)"))
        front = sorted((point[2], point[1]) for point in points if not dominated(point, points))
        axes.plot(*zip(*front), "k--", linewidth=0.8, label="Pareto front")
        for values, set_limits in (([p[2] for p in points], axes.set_xlim), ([p[1] for p in points], axes.set_ylim)):
            margin = max(2.0, 0.1 * (max(values) - min(values)))
            set_limits(max(-1.0, min(values) - margin), min(101.0, max(values) + margin))
        axes.set_xlabel(f"{worst_case_titles(run.config)[group]} accuracy (%)")
        axes.set_ylabel("clean accuracy (%)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.02, 0.5))
        title = f"Clean vs robust ({worst_case_titles(run.config)[group]}); legend: denoiser calls per image"
        axes.set_title(title, fontsize="medium")
        path = plot_dir / f"pareto_{group}.png"
        figure.savefig(path, dpi=120)
        plots.append((title, path))
    return plots


def _sweep_plots(run: Run, plot_dir: Path, setting: str) -> list[tuple[str, Path]]:
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
        figure = new_figure((5.5, 4))
        axes = figure.subplots()
        for defense in run.config.defenses:
            rows = [run.row(defense.name, a.name) for a in attacks]
            points = [(value(a) * scale, r) for a, r in zip(attacks, rows) if r["total"]]
            if points:
                _error_bars(axes, [x for x, _ in points], [r for _, r in points], defense.name)
        details = plural(first.iterations, "step") if first.kind != "autoattack" else first.version
        if setting == "eps":
            details += f", EOT {first.eot_draws}" if first.eot_draws > 1 else ""
            title = f"Accuracy vs ε: {first.kind} {NORM_LABELS.get(first.norm, first.norm)} ({details})"
            xlabel = "ε (×1/255)" if scale == 255 else "ε"
        else:
            eps = format_eps(first.eps, first.norm)
            title = f"Accuracy vs EOT: {first.kind} {NORM_LABELS.get(first.norm, first.norm)} ε={eps} ({details})"
            xlabel = "EOT draws per step"
        _finish_axes(axes, xlabel, title)
        path = plot_dir / f"{name}.png"
        figure.savefig(path, dpi=120)
        plots.append((title, path))
    return plots


def _purifier_plots(run: Run, plot_dir: Path) -> list[tuple[str, Path]]:
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
        figure = new_figure((5.5, 4))
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
