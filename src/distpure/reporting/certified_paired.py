"""The certification report's *Paired with* section: each setting of a run beside the setting of
another run (``paired_with``) resolved the same way, image by image (``certification.paired``)."""
from __future__ import annotations

from pathlib import Path

from ..certification.paired import PairedSetting, paired_setting, same_smoothing
from .certified_run import CertifiedRun, radius_label
from .markdown import table


def paired_comparisons(run: CertifiedRun, other: CertifiedRun) -> tuple[list[PairedSetting], list[str]]:
    """Each setting of ``run`` paired with ``other``'s setting resolved the same way, at the radii
    both can reach; and the names of the settings ``other`` has no match for."""
    if not (run.resolved and other.resolved):
        return [], [s.name for s in run.config.settings]
    found, unmatched = [], []
    for setting in run.config.settings:
        match = same_smoothing(run.resolved, other.resolved, setting.name)
        if match is None:
            unmatched.append(setting.name)
            continue
        reach = min(run.reach(setting), other.reach(other.config.setting(match)))
        radii = tuple(r for r in run.config.report_radii if r <= reach)
        found.append(paired_setting(setting.name, match, run.records, other.records, radii))
    return found, unmatched


def paired_lines(run: CertifiedRun) -> list[str]:
    """*Paired with another run*: per setting and reported radius, both runs' certified accuracy on
    the images both have, the images only one certifies, and the exact McNemar p-value;
    nothing where the config pairs with no run."""
    if run.config.paired_with is None:
        return []
    where = Path(run.config.paired_with)
    lines = [f"## Paired with `{where}`", ""]
    if not (where / "config.yaml").is_file():
        return lines + [f"`{where}` holds no certification run here (paths are relative to the working "
                        "directory the report is written from); nothing to compare.", ""]
    other = CertifiedRun.load(where)
    found, unmatched = paired_comparisons(run, other)
    rows = [[p.setting, p.other, p.images, radius_label(r.radius, run.config),
             *(f"{100 * count / p.images:.1f}" if p.images else "–" for count in (r.ours, r.theirs)),
             f"{r.only_ours} / {r.only_theirs}", f"{r.p_value:.2g}"] for p in found for r in p.radii]
    lines += [f"Each setting beside the setting of `{other.config.name}` resolved the same way (denoiser, σ, n, "
              "noise level, purifier, n0, α), on the images (dataset indices) both runs have records for, at "
              "the reported radii both can certify. *Only here / only there*: images certified correct at "
              "that radius by one run and not the other; *McNemar p*: the exact two-sided test that the "
              "split of those images is even (statsmodels), a paired test the two marginal figures cannot "
              "give.", ""]
    if rows:
        lines += [*table(["setting", f"paired with ({other.config.name})", "images", "r", "here (%)", "there (%)",
                          "only here / only there", "McNemar p"], rows), ""]
    if unmatched:
        lines += [f"Not paired (`{other.config.name}` has no setting resolved the same way): "
                  + ", ".join(unmatched) + ".", ""]
    return lines
