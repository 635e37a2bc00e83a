"""The report of a certification run: ``report.md`` and ``certified_accuracy.png`` in its run
directory, recomputed from config.yaml, resolved.json, sessions.jsonl and the records, so that
a stopped run reports too (over the images it has records for).

Certified accuracy comes from ``certification.summary`` (95 % Wilson intervals over images, as
the evaluation report's); the empirical figures it is set beside are an evaluation run's
``results.csv`` (``empirical``); what an L2 certificate does not cover is computed from the
image dimension.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from scipy.stats import binom, norm

from ..attacks.base import parse_epsilon
from ..certification.attack_run import summarize_attack_run
from ..certification.config import PAPER_L2_RADIUS, CertifyConfig, SettingConfig
from ..certification.summary import base_accuracy, ceiling_radius
from ..devices import describe_hardware
from ..evaluation.timing import duration
from .certified_paired import compared_lines, paired_lines
from .certified_plot import certified_curves, certified_plot, curve_radii
from .certified_run import CertifiedRun, radius_label
from .empirical import HONEST_RUN, Figure, ThreatFigures, read_rows, threat_figures, threats
from .markdown import grey_levels, table, victim_text
from .report import json_ready

PLOT_FILE = "certified_accuracy.png"


def certified_summary(run_dir: str | Path) -> dict:
    """The recomputed summary of a certification run, JSON-ready (``distpure report --json``)."""
    run = CertifiedRun.load(run_dir)
    return json_ready({"run_dir": str(run_dir), "radii": list(run.config.report_radii), "settings": run.summary,
                       "records": len(run.records)})


def write_certified_report(run_dir: str | Path, config: CertifyConfig | None = None,
                           empirical: str | Path | None = HONEST_RUN) -> Path:
    """Write report.md (and the plot, once there are records) into ``run_dir``; return report.md.
    ``empirical``: the evaluation run whose L2 figures are set beside the certified ones."""
    run = CertifiedRun.load(run_dir, config)
    rows = read_rows(empirical) if empirical is not None else None
    threat = parse_epsilon(PAPER_L2_RADIUS)
    figures = threat_figures(rows, "l2", threat) if rows else []
    plot = _plot(run, figures, threat) if run.records else None
    summary = run.summary
    lines = [*_run_lines(run, summary), *certified_lines(run, summary), *base_lines(run),
             *settings_lines(run, summary),
             *comparison_lines(run, summary, figures, empirical, plot, threat), *compared_lines(run),
             *paired_lines(run),
             *attack_lines(run), *caveat_lines(run, rows or [])]
    run.files.report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return run.files.report


def _plot(run: CertifiedRun, figures: list[ThreatFigures], threat: float) -> Path:
    """certified_accuracy.png: every setting's curve, and the strongest attacks' figures at ``threat``."""
    kinds = {s.name: s.denoiser for s in run.config.settings}
    radii = curve_radii(run.records, max(run.config.report_radii))
    curves = certified_curves(run.records, list(kinds), radii)
    marks = [(f"{f.defence}, empirical: {f.strongest.attack}", threat, f.strongest.accuracy)
             for f in figures if f.strongest is not None]
    return certified_plot(radii, curves, kinds, marks, run.files.root / PLOT_FILE)


def _interval(cell: dict) -> str:
    return f"{100 * cell['value']:.1f} [{100 * cell['low']:.1f}, {100 * cell['high']:.1f}]"


def _done(row: dict) -> str:
    return f"{row['images']}" + (f"/{row['planned']}" if row["planned"] is not None else "")


def _finished(summary: dict) -> bool:
    return all(row["planned"] is not None and row["images"] >= row["planned"] for row in summary.values())


def _run_lines(run: CertifiedRun, summary: dict) -> list[str]:
    """Title, description, a stopped run's warning and what ran where."""
    config, latest, hardware = run.config, (run.sessions[-1] if run.sessions else {}), run.hardware
    lines = [f"# {config.name}: certified L2 accuracy", ""]
    if config.description:
        lines += [config.description.strip(), ""]
    if not _finished(summary):
        lines += ["> **Partial run**: not every setting has all its images; each row covers the images "
                  "it has records for (the first of the seeded data order, a fair sample).", ""]
    data, models = config.data, config.models
    return lines + [
        "## Run", "",
        f"- data: {data.dataset} {data.split}, the first {data.limit} images of the order drawn with "
        f"seed {data.seed}" if data.limit is not None else f"- data: {data.dataset} {data.split}, every image",
        f"- models: {victim_text(models)}, diffusion `{models.diffusion}`",
        f"- CERTIFY (Cohen et al. 2019): n0 = {config.n0} selection draws, n estimation draws per setting, "
        f"α = {config.alpha:g}, {config.batch_size} draws per call; skip_wrong {config.skip_wrong}, "
        f"curtail {config.curtail}; seed {config.seed}",
        f"- hardware: {describe_hardware(hardware) if hardware else 'not recorded'}; "
        f"processes: {latest.get('processes', 1)}; sessions: {len(run.sessions)}",
        f"- wall time: {duration(run.metadata.get('wall_time_seconds'))}",
        f"- commit: `{run.metadata.get('git_commit') or 'recorded when the run finishes'}`", ""]


def certified_lines(run: CertifiedRun, summary: dict) -> list[str]:
    """*Certified accuracy*: per setting, at each reported radius, with its interval; a dash
    where the radius is beyond what the setting's n can certify."""
    radii = run.config.report_radii
    rows = [[s.name, _done(summary[s.name]),
             *(_interval(summary[s.name]["certified"][f"{r:.6g}"])
               if summary[s.name]["images"] and r <= run.reach(s) else "–" for r in radii)]
            for s in run.config.settings]
    header = ["setting", "images", *(f"r = {radius_label(r, run.config)}" for r in radii)]
    return ["## Certified accuracy (%)", "",
            "An image counts at L2 radius r (pixel units in [0, 1]) when the class its selection draws "
            "pick is its label, CERTIFY does not abstain and the certified radius is at least r; the "
            "denominator is every image the setting has a record for (a skipped image, whose selection "
            f"picked a wrong class, counts as not certified). Each certificate holds with probability at "
            f"least 1 − α = {1 - run.config.alpha:g}; the brackets are 95 % Wilson intervals over images. "
            "–: beyond the largest radius the setting's n can certify (*reach* below)"
            + (", or no records yet" if not _finished(summary) else "") + ".", "",
            *table(header, rows, ["---", "---:", *[":---:"] * len(radii)]), ""]


def base_lines(run: CertifiedRun) -> list[str]:
    """*The base classifier under noise*: per setting, how often the denoised victim is right on a
    noise draw, and how many images could reach each radius with unlimited draws (estimated from
    the selection draws): what the certified figures approach as n grows."""
    radii = run.config.report_radii
    rows = []
    for s in run.config.settings:
        base = base_accuracy(run.records, s.name, radii)
        if base["images"]:
            rows.append([s.name, f"{s.sigma:g}", base["images"], str(base["per_draw"]),
                         *(f"{100 * base['reaching'][f'{r:.6g}'] / base['images']:.1f}" for r in radii)])
    if not rows:
        return []
    header = ["setting", "σ", "images", "right draws (%)",
              *(f"ceiling ≥ {radius_label(r, run.config)}" for r in radii)]
    threat = parse_epsilon(PAPER_L2_RADIUS)
    needs = ", ".join(f"{100 * float(norm.cdf(threat / sigma)):.5g} % at σ = {sigma:g}"
                      for sigma in sorted({s.sigma for s in run.config.settings}))
    return ["## The base classifier under noise (what the certificates approach)", "",
            f"*Right draws*: the mean over images of the share p of the n0 = {run.config.n0} selection draws "
            "(noise, denoiser, victim) that return the label, with a 95 % interval over images. *Ceiling ≥ r*: "
            "the images (%) whose p would certify radius r with unlimited draws, σ·Φ⁻¹(p) ≥ r with p > 1/2, "
            f"were p exact; radius {PAPER_L2_RADIUS} needs p ≥ Φ(r/σ): {needs}. The ceiling is an estimate "
            f"from {run.config.n0} draws per image, noisy near those thresholds ({_ceiling_noise(run, threat)}), "
            "but it shows what limits a setting: the certified figure approaches it as n grows, and only a "
            "base classifier more often right under the noise raises it.", "",
            *table(header, rows, ["---", "---:", "---:", ":---:", *[":---:"] * len(radii)]), ""]


def _ceiling_noise(run: CertifiedRun, radius: float) -> str:
    """How often the ceiling test at ``radius`` errs near its threshold, at the first setting's σ:
    the chance an image with true p = 0.95 passes, and that one with p = 0.99 fails."""
    n0, sigma = run.config.n0, run.config.settings[0].sigma
    needed = next((k for k in range(n0 // 2 + 1, n0 + 1) if (ceiling_radius(k / n0, sigma) or 0.0) >= radius - 1e-12),
                  n0)
    return (f"at σ = {sigma:g} and {radius_label(radius, run.config)}, {needed} of {n0} right: an image with true "
            f"p = 0.95 passes {100 * float(binom.sf(needed - 1, n0, 0.95)):.0f} % of the time, one with p = 0.99 "
            f"fails {100 * float(binom.cdf(needed - 1, n0, 0.99)):.0f} %")


def _denoiser_text(setting: SettingConfig, resolved: dict) -> str:
    """The denoiser kind with what shapes it: reverse steps, guidance scale, votes."""
    purifier = resolved.get("purifier") or {}
    steps = purifier.get("num_steps", setting.steps)
    return {"none": "none (the victim on the noisy image)", "one-shot": "one-shot x̂0",
            "multistep": f"multistep, {steps} steps",
            "guided": f"guided, {steps} steps, scale {purifier.get('victim_scale', setting.guidance_scale)}",
            "voted": f"voted, {setting.votes} × {steps} steps"}[setting.denoiser]


def _time_text(level: dict | None, sigma: float) -> str:
    """Where σ lands on the diffusion model's time axis (resolved.json's noise level)."""
    if not level:
        return "–"
    where = f"t = {level['label']:.4g}" if level["continuous"] else f"step {level['timestep']}"
    return f"{where}: √((1−ᾱ)/ᾱ) = {level['model_noise']:.3f} (2σ = {2 * sigma:g})"


def settings_lines(run: CertifiedRun, summary: dict) -> list[str]:
    """*Settings and cost*: per setting its denoiser, σ and diffusion time, n, reach, images,
    abstentions, skipped and curtailed samples, seconds and denoiser calls per image."""
    rows = []
    for s in run.config.settings:
        row, resolved = summary[s.name], run.resolved.get("settings", {}).get(s.name, {})
        abstained = "–" if row["abstention_rate"] is None else (
            f"{100 * row['abstention_rate']:.1f} % ({row['abstained']}/{row['images'] - row['skipped']})")
        per_image = [f"{row[key]:.1f}" if row[key] is not None else "–"
                     for key in ("seconds_per_image", "denoiser_calls_per_image")]
        rows.append([s.name, _denoiser_text(s, resolved), f"{s.sigma:g}", _time_text(resolved.get("noise_level"),
                     s.sigma), run.config.draws(s), f"{run.reach(s):.3f}", _done(row), abstained, row["skipped"],
                     row["curtailed"], *per_image])
    hardware = run.hardware
    where = f"on {hardware['cpu']} ({hardware['torch_threads']} threads)" if hardware else "on unrecorded hardware"
    return ["## Settings and cost", "",
            "σ is in pixel units; the noisy image times √ᾱ is a diffusion state where √((1−ᾱ)/ᾱ) = 2σ "
            "(the model's [−1, 1] scale), the nearest step of a discrete schedule. *reach*: the largest "
            "radius n draws can certify at σ and α (every draw right). Abstained: among images estimated "
            "(not skipped). Curtailed: drawing stopped once every reported radius was decided (exact there, "
            f"a lower bound between them). Seconds and denoiser calls are means per image, {where}.", "",
            *table(["setting", "denoiser", "σ", "diffusion time", "n", "reach", "images", "abstained",
                    "skipped", "curtailed", "s / image", "denoiser calls / image"], rows), ""]


def comparison_lines(run: CertifiedRun, summary: dict, figures: list[ThreatFigures],
                     empirical: str | Path | None, plot: Path | None, threat: float) -> list[str]:
    """*Certified and empirical*: the plot, and the evaluation run's figures at the L2 threat
    radius as the upper bounds they are."""
    label = radius_label(threat, run.config)
    lines = ["## Certified (lower bounds) and empirical (upper bounds)", ""]
    if plot is not None:
        lines += ["Certified accuracy against radius, one step curve per setting on the records' own radii "
                  "(a curtailed image's radius is a lower bound between the reported radii); in bold, per "
                  "denoiser with several σ, the best setting at each radius (σ chosen after the fact, so "
                  "no single classifier's figure); markers: the strongest attacks' empirical figures below.", "",
                  f"![certified accuracy]({plot.name})", ""]
    strongest = [f.strongest for f in figures if f.strongest is not None]
    if not strongest:
        where = "no run named" if empirical is None else f"`{empirical}` holds no L2 {label} figures"
        return lines + [f"No empirical figures to compare: {where} (`--empirical RUN_DIR` names an "
                        "evaluation run with a results.csv).", ""]
    scored = next((f.picked.draws for f in figures if f.picked is not None and f.picked.draws > 1), None)
    rows = [[f.defence, _figure_cell(f.clean), _figure_cell(f.strongest, named=True), _figure_cell(f.picked),
             _figure_cell(f.resubmission)] for f in figures]
    report = Path(empirical) / "report.md"
    source = (f"[{Path(empirical).name}]({os.path.relpath(report, run.files.root)})" if report.is_file()
              else f"`{empirical}`")
    return lines + [
        f"Empirical L2 {label} accuracy (%) of {source}: {strongest[0].scoring} accuracy "
        f"over up to {max(f.draws for f in strongest)} scoring draws per image (noise no attacker saw), on "
        f"{strongest[0].samples} images, with 95 % intervals. These are **upper bounds** on robust accuracy, "
        "valid against the named attacks only: a stronger attack may lower them. *Strongest attack*: the one "
        "attack leaving the least; *picked*: per image the candidate the attacker's selection draws see doing "
        "worst" + (f", scored on the {scored} other draws" if scored else "") + "; *resubmission*: right in "
        "every draw of every attack. The certified figures above are **lower bounds**, against every L2 "
        "perturbation within the radius, but of another classifier: the smoothed one, which takes n0 + n "
        "draws per image and may abstain.", "",
        *table(["defence", "clean", f"strongest attack, L2 {label}", f"picked, L2 {label}",
                f"resubmission, L2 {label}"], rows), "",
        f"Certified at L2 {label}: " + _best_at(run, summary, threat) + ".", ""]


def attack_lines(run: CertifiedRun) -> list[str]:
    """*The certificates under attack*: SmoothAdv's accuracy (PREDICT) and the violations it
    found, or what is still to run; nothing where the config has no attack section."""
    attack = run.config.attack
    if attack is None:
        return []
    summary = summarize_attack_run(run.config, run.files)
    label = radius_label(attack.epsilon, run.config)
    lines = ["## The certificates under attack", "",
             f"SmoothAdv (L2 PGD on the mean of {attack.m} noise draws' probabilities, exact gradients through "
             f"the denoiser, {attack.steps} steps, {attack.restarts} restart(s)) at ε = {label} on `{attack.setting}`, "
             f"each example classified by PREDICT with n = {attack.n} fresh draws (abstaining counts as wrong). "
             f"A **violation** is an image certified correct at a radius of at least ε whose example PREDICT "
             f"assigns another class: the certificate or PREDICT erred (each with probability at most α), or the "
             f"code is wrong. Command: `distpure certify CONFIG --out RUN_DIR --attack`.", ""]
    if not summary["images"]:
        return lines + [f"No attack records yet ({summary['waiting']} certified images waiting).", ""]
    share = summary["accuracy"]
    rows = [[attack.setting, summary["images"], f"{summary['waiting']}",
             f"{100 * share['value']:.1f} [{100 * share['low']:.1f}, {100 * share['high']:.1f}]",
             summary["abstained"], summary["certified_at_epsilon"], summary["violations"],
             f"{summary['violations_by_chance_at_most']:.2g}", f"{summary['seconds_per_image']:.1f}"]]
    return lines + [*table(["setting", "images attacked", "waiting", f"accuracy under attack, L2 {label} (%)",
                            "abstained", f"certified at ≥ {label}", "violations", "by chance (at most)",
                            "s / image"], rows), ""]


def _figure_cell(figure: Figure | None, named: bool = False) -> str:
    if figure is None:
        return "–"
    return f"{figure} ({figure.attack})" if named else str(figure)


def _best_at(run: CertifiedRun, summary: dict, radius: float) -> str:
    """The best setting of each denoiser kind at ``radius``, where any reaches it."""
    best: dict[str, tuple[float, str]] = {}
    for s in run.config.settings:
        row = summary[s.name]
        if row["images"] and radius <= run.reach(s):
            cell = row["certified"][f"{radius:.6g}"]
            if s.denoiser not in best or cell["value"] > best[s.denoiser][0]:
                best[s.denoiser] = (cell["value"], f"{s.denoiser} {_interval(cell)} ({s.name}, {row['images']} images)")
    return "; ".join(text for _, text in best.values()) or "no setting with records reaches it"


def linf_radius(l2_radius: float, dimension: int) -> float:
    """The largest L∞ radius whose ball lies inside the L2 ball of ``l2_radius`` in ``dimension``
    dimensions: the L∞ ball's corners lie ε·√d from its centre."""
    return l2_radius / math.sqrt(dimension)


def _levels(value: float) -> str:
    return f"{255 * value:.1f}/255"


def caveat_lines(run: CertifiedRun, rows: list[dict]) -> list[str]:
    """*What an L2 certificate does not cover*, computed from the image dimension and the
    evaluation run's L∞ threats."""
    d = run.dimension()
    lines = ["## What an L2 certificate does not cover", "",
             "- Another classifier: a certificate is about the smoothed classifier (many noise draws per "
             "image, abstaining when unsure), not about the purification defences of the empirical table.",
             f"- Each image's certificate holds with probability at least 1 − α = {1 - run.config.alpha:g} "
             "over its noise draws, not surely."]
    if d is None:
        return lines + ["- Other norms: the image dimension could not be read here, so the L∞ radius each L2 "
                        "radius covers (r/√d) is not computed.", ""]
    reach = max(run.config.settings, key=run.reach)
    covered = [f"L2 {radius_label(r, run.config)} → L∞ {_levels(linf_radius(r, d))}"
               for r in run.config.report_radii if r > 0]
    lines.append(f"- Other norms: an L2 ball of radius r holds only the L∞ ball of radius r/√d, d = {d} values "
                 f"per image (√d = {math.sqrt(d):.1f}): " + ", ".join(covered) + f"; the largest radius any "
                 f"setting here can certify, {run.reach(reach):.3f} ({reach.name}), covers L∞ "
                 f"{_levels(linf_radius(run.reach(reach), d))}.")
    for eps in threats(rows, "linf"):
        needed, named = eps * math.sqrt(d), grey_levels(eps) or f"{eps:g}"
        text = f"- L∞ {named} needs an L2 certificate of radius {named} × √d = {needed:.3f}"
        if needed <= run.reach(reach):
            lines.append(f"{text}, within the reach of {reach.name} (not a reported radius).")
            continue
        found = "; ".join(f"{f.defence} {100 * f.picked.accuracy:.1f}" for f in threat_figures(rows, "linf", eps)
                          if f.picked is not None)
        lines.append(f"{text}, beyond every setting's reach: nothing here certifies it, and the empirical "
                     f"L∞ {named} finding stands (worst case picked on selection draws, %: {found}).")
    return lines + [""]
