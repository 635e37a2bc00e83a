"""Text for the report: numbers, ε, threat models, durations, the victim, defence settings and
Markdown tables, formatted one way everywhere."""
from __future__ import annotations

from ..attacks.suite import AttackConfig
from ..evaluation.config import DefenseConfig, ExperimentConfig, ModelsConfig
from ..evaluation.protocol import threat_group
from ..evaluation.summary import worst_cases


PURIFIER_COLUMNS = ("t_star", "num_steps", "victim_scale", "guidance")
NORM_LABELS = {"linf": "L∞", "l2": "L2"}


def format_number(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def grey_levels(eps: float) -> str | None:
    """``8/255`` when ε is a whole number of grey levels (within the rounding of a threat group's
    8 decimals), else None."""
    levels = eps * 255
    return f"{round(levels)}/255" if eps > 0 and abs(levels - round(levels)) < 1e-5 else None


def format_eps(eps: float, norm: str) -> str:
    """8/255 rather than 0.0313725 for an L∞ ε that is a whole number of grey levels."""
    return (norm == "linf" and grey_levels(eps)) or f"{eps:g}"


def threat_label(norm: str, eps: float, frozen: bool) -> str:
    """A threat group as a reader names it: ``L2 128/255`` (ε in grey levels wherever it is a
    whole number of them), ``, frozen noise`` for the deterministic white-box threat."""
    amount = grey_levels(eps) or f"{eps:g}"
    return f"{NORM_LABELS.get(norm, norm)} {amount}" + (", frozen noise" if frozen else "")


def group_key(group: list[AttackConfig]) -> tuple[str, float, bool]:
    """The (norm, ε, frozen) of a worst case's group (its attacks other than clean)."""
    return threat_group(next(attack for attack in group if attack.kind != "clean"))


def worst_case_titles(config: ExperimentConfig) -> dict[str, str]:
    """Each worst-case column as a reader names it: ``worst case, L2 128/255``."""
    return {name: f"worst case, {threat_label(*group_key(group))}" for name, group in worst_cases(config).items()}


def threat_model(row: dict) -> str:
    if row["kind"] == "clean":
        return "clean"
    norm = NORM_LABELS.get(row["norm"], row["norm"])
    text = f"{row['kind']} {norm} ε={format_eps(row['eps'], row['norm'])}"
    if row["kind"] != "autoattack":
        text += f", {plural(row['steps'], 'step')}"
    return text + (f", EOT {row['eot']}" if row["eot"] > 1 else "")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _cell(text: object) -> str:
    """Markdown table cell text (pipes escaped, no line breaks)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[object]], align: list[str] | None = None) -> list[str]:
    align = align or ["---"] * len(header)
    return ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows)]


def settings_text(settings: dict, spec: DefenseConfig) -> str:
    if spec.kind == "purifier":
        text = ", ".join(f"{key}={format_number(settings.get(key))}" for key in PURIFIER_COLUMNS
                         if key in settings)
        extra = {k: v for k, v in spec.purifier.items() if k not in PURIFIER_COLUMNS}
        text += "".join(f", {key}={format_number(value)}" for key, value in sorted(extra.items()))
        text += f", diffusion={spec.diffusion}" if spec.diffusion else ""
    elif spec.kind == "preprocessing":
        text = ", ".join(f"{key}={value}" for key, value in spec.preprocessing.items())
    elif spec.kind == "classifier":
        text = str(spec.classifier)
    else:
        text = "no defence"
    return text + (f", votes={spec.votes}" if spec.votes > 1 else "")


def victim_text(models: ModelsConfig) -> str:
    """The victim as a report names it: its name, or its weights file and the architecture they
    load into (a fine-tuned victim is its weights, not the architecture's own)."""
    if models.victim_arch is None:
        return f"victim `{models.victim}`"
    return f"victim `{models.victim_arch}` with the weights `{models.victim}`"
