"""Certified accuracy against L2 radius: one step curve per setting on the fine grid of the
records' own radii, and per denoiser kind with several settings its envelope (the best setting
at each radius, over σ) drawn bold; empirical figures of an evaluation run as markers."""
from __future__ import annotations

from pathlib import Path

from ..certification.summary import summarize_records
from .plots import new_figure

#: the curves' grid ends this far beyond the largest radius (where every curve is at zero)
_MARGIN = 1.05


def curve_radii(records: list[dict], end: float) -> tuple[float, ...]:
    """0 and every radius a record certifies its label at: the radii where a certified-accuracy
    curve steps down (it is constant between them and zero beyond the last), and a last point
    past them, at ``end`` at least, where every curve shows its zero."""
    radii = {0.0, *(float(r["radius"]) for r in records if r["correct"] and r["radius"] is not None)}
    return tuple(sorted(radii | {max(end, _MARGIN * max(radii))}))


def certified_curves(records: list[dict], settings: list[str], radii: tuple[float, ...]) -> dict[str, list[float]]:
    """Certified accuracy (fraction of the setting's images) at each of ``radii``, per setting
    with records (``summarize_records``' figures, so the curve meets the table at its radii)."""
    summary = summarize_records(records, settings, radii)
    return {name: [row["certified"][f"{r:.6g}"]["value"] for r in radii]
            for name, row in summary.items() if row["images"]}


def envelopes(curves: dict[str, list[float]], kinds: dict[str, str]) -> dict[str, list[float]]:
    """Per denoiser kind with at least two curves, the maximum over them at each radius: the
    best σ chosen per radius after the fact (as Cohen et al. and Carlini et al. report it), so
    it is no one classifier's certified accuracy."""
    grouped: dict[str, list[list[float]]] = {}
    for name, curve in curves.items():
        grouped.setdefault(kinds[name], []).append(curve)
    return {kind: [max(values) for values in zip(*group)] for kind, group in grouped.items() if len(group) > 1}


def certified_plot(radii: tuple[float, ...], curves: dict[str, list[float]], kinds: dict[str, str],
                   marks: list[tuple[str, float, float]], path: Path) -> Path:
    """Draw the curves (thin) and their envelopes (bold) against ``radii``, and ``marks``
    ((label, radius, accuracy) of empirical figures) as markers; save to ``path``."""
    figure = new_figure((9, 4.5))
    axes = figure.subplots()
    colours = {kind: f"C{index}" for index, kind in enumerate(dict.fromkeys(kinds[name] for name in curves))}
    for name, curve in curves.items():
        axes.plot(radii, [100 * v for v in curve], drawstyle="steps-pre", linewidth=1, alpha=0.7,
                  color=colours[kinds[name]], linestyle=_dashes(name, curves, kinds), label=name)
    for kind, curve in envelopes(curves, kinds).items():
        axes.plot(radii, [100 * v for v in curve], drawstyle="steps-pre", linewidth=3, color=colours[kind],
                  label=f"{kind}: envelope over σ")
    for index, (label, radius, accuracy) in enumerate(marks):  # markers differ: figures may coincide
        axes.plot([radius], [100 * accuracy], marker="xo+D"[index % 4], markersize=9, markeredgewidth=2,
                  fillstyle="none", linestyle="none", color=f"C{len(colours) + index}", label=label)
    axes.set_xlabel("L2 radius (pixel units in [0, 1])")
    axes.set_ylabel("certified accuracy (%)")
    axes.set_xlim(0, radii[-1])
    axes.set_ylim(-2, 102)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    axes.set_title("Certified L2 accuracy (lower bounds); empirical (upper bounds) as markers", fontsize="medium")
    figure.savefig(path, dpi=120)
    return path


def _dashes(name: str, curves: dict[str, list[float]], kinds: dict[str, str]) -> str:
    """Tell apart the settings of one kind (one colour) by line style, in their order."""
    siblings = [other for other in curves if kinds[other] == kinds[name]]
    return ("-", "--", ":", "-.")[siblings.index(name) % 4]
