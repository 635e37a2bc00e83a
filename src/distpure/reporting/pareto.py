"""The trade-off the paper is about: per threat group, each defence's clean and worst-case
accuracy and cost, and which defences lie on the Pareto front."""
from __future__ import annotations

from ..evaluation.summary import worst_cases
from .run import Run



def pareto_points(run: Run) -> dict[str, list[tuple[str, float, float, int | None]]]:
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


def dominated(point: tuple[str, float, float, int | None], others: list) -> bool:
    """Whether another defence is at least as accurate clean and robust, at no more cost, and
    better in one of the three."""
    _, clean, robust, cost = point
    cost = cost if cost is not None else 0
    for _, c, r, k in others:
        k = k if k is not None else 0
        if c >= clean and r >= robust and k <= cost and (c, r, -k) != (clean, robust, -cost):
            return True
    return False
