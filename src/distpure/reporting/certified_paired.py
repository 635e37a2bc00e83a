"""The certification report's *Paired with* section: each setting of a run beside the setting of
another run (``paired_with``) resolved the same way, image by image (``certification.paired``)."""
from __future__ import annotations

from pathlib import Path

from ..certification.config import PAPER_L2_RADIUS
from ..certification.paired import PairedSetting, matching_setting, paired_setting
from ..certification.runner import is_certification_dir
from .certified_run import CertifiedRun, radius_label
from .markdown import table, victim_text


def pair_settings(run: CertifiedRun, other: CertifiedRun) -> tuple[list[PairedSetting], list[str]]:
    """Each setting of ``run`` paired with ``other``'s setting resolved the same way, at the radii
    both runs report within the setting's reach; and the names of the settings left unpaired."""
    found, unmatched = [], []
    for setting in run.config.settings:
        resolved = run.resolved and other.resolved
        match = matching_setting(run.resolved, other.resolved, setting.name) if resolved else None
        if match is None:
            unmatched.append(setting.name)
            continue
        theirs = {f"{r:.6g}" for r in other.config.report_radii}
        radii = tuple(r for r in run.config.report_radii if f"{r:.6g}" in theirs and r <= run.reach(setting))
        found.append(paired_setting(setting.name, match, run.records, other.records, radii))
    return found, unmatched


def _other_inputs(run: CertifiedRun, other: CertifiedRun) -> list[str]:
    """What the two runs feed their settings that is not the victim: the data and the diffusion model."""
    mine, theirs = run.config, other.config
    pairs = {"dataset": (mine.data.dataset, theirs.data.dataset), "split": (mine.data.split, theirs.data.split),
             "diffusion model": (mine.models.diffusion, theirs.models.diffusion)}
    return [f"{name} {a!r} here, {b!r} there" for name, (a, b) in pairs.items() if a != b]


#: what the columns of a paired table mean
_COLUMNS = ("*Only …*: images certified correct at that radius by one setting and not the other; *difference*: "
            "the first minus the second in points, with a 95 % paired interval; *McNemar p*: the exact two-sided "
            f"test that those images split evenly (statsmodels). The paper's threat, {PAPER_L2_RADIUS}, is the one "
            "test chosen in advance; the other radii are descriptive (nested outcomes, no correction).")


def _table(found: list[PairedSetting], run: CertifiedRun, first: str, second: str, only: str) -> list[str]:
    """One row per (pair, radius): images, both accuracies, the discordant images, difference, p;
    one row of dashes for a pair with no shared images yet."""
    rows = [[p.setting, p.other, p.images, radius_label(r.radius, run.config),
             *(f"{100 * count / p.images:.1f}" for count in (r.ours, r.theirs)),
             f"{r.only_ours} / {r.only_theirs}", str(r.difference), f"{r.p_value:.2g}"]
            for p in found if p.images for r in p.radii]
    rows += [[p.setting, p.other, 0, *["–"] * 6] for p in found if not p.images]
    return table(["setting", "paired with", "images", "r", first, second, only, "difference", "McNemar p"], rows)


def compared_lines(run: CertifiedRun) -> list[str]:
    """*Settings compared image by image*: the config's ``compare`` pairs of this run, on the images
    both settings have records for, at the reported radii both can certify; nothing without pairs."""
    found = []
    for name, reference in run.config.compare:
        setting, other = run.config.setting(name), run.config.setting(reference)
        radii = tuple(r for r in run.config.report_radii if r <= min(run.reach(setting), run.reach(other)))
        found.append(paired_setting(name, reference, run.records, run.records, radii))
    if not found:
        return []
    return ["## Settings compared image by image", "",
            "The config's `compare` pairs: each setting beside its reference "
            "on the images (dataset indices) both have records for, at the radii both can certify. " + _COLUMNS, "",
            *_table(found, run, "setting (%)", "reference (%)", "only setting / only reference"), ""]


def paired_lines(run: CertifiedRun) -> list[str]:
    """*Paired with another run*: per setting and radius, both runs' certified accuracy on the
    images both have records for, the images only one certifies, the paired difference and the
    exact McNemar p-value; nothing where the config pairs with no run."""
    if run.config.paired_with is None:
        return []
    where = Path(run.config.paired_with)
    lines = [f"## Paired with `{where}`", ""]
    if not is_certification_dir(where):
        return lines + [f"`{where}` holds no certification run here (paths are relative to the working "
                        "directory the report is written from); nothing to compare.", ""]
    other = CertifiedRun.load(where)
    differing = _other_inputs(run, other)
    if differing:
        return lines + [f"Not comparable image by image: {'; '.join(differing)}.", ""]
    found, unmatched = pair_settings(run, other)
    lines += [f"Here: {victim_text(run.config.models)}; there (`{other.config.name}`): "
              f"{victim_text(other.config.models)}; the same data and diffusion model. Each setting beside the "
              "setting there resolved the same way (denoiser, σ, n, noise level, purifier, n0, α, precision), on "
              "the images (dataset indices) both runs have records for, at the radii both report. "
              + _COLUMNS, ""]
    if found:
        lines += [*_table(found, run, "here (%)", "there (%)", "only here / only there"), ""]
    if unmatched:
        lines += [f"Not paired (`{other.config.name}` has no setting resolved the same way): "
                  + ", ".join(unmatched) + ".", ""]
    return lines
