"""Two certification runs compared image by image: the same denoiser and certification procedure
(e.g. one-shot at σ 0.25, n = 2000, α = 0.001) in front of two victims (fine-tuned and off the
shelf), on the images both runs have records for. A paired comparison sees what two marginal
figures hide: how many images each certifies that the other does not, and whether that split is
more than chance (the exact McNemar test on the discordant images, from statsmodels).

The certified-correct outcome of a curtailed record is exact only at its own run's reported radii,
so the comparison is made at the radii both runs report.
"""
from __future__ import annotations

from dataclasses import dataclass

from statsmodels.stats.contingency_tables import mcnemar

from ..evaluation.stats import Difference, paired_difference
from .runner import record_shaping
from .summary import certified_correct

#: what must agree, besides a setting's own resolved entry, for two settings to be compared:
#: the procedure (another n0 or α changes every certificate's strength) and the precision
SHARED = ("n0", "alpha", "resolved_precision")


@dataclass(frozen=True)
class PairedRadius:
    """At one radius, over the shared images: how many each run certifies correct, how many only
    one of them does, the mean paired difference (ours − theirs) with its 95 % interval, and the
    exact two-sided McNemar p-value of the split."""

    radius: float
    ours: int
    theirs: int
    only_ours: int
    only_theirs: int
    difference: Difference
    p_value: float


@dataclass(frozen=True)
class PairedSetting:
    """A setting of this run, the setting of the other run resolved the same way, the images
    (dataset indices) both have records for, and the comparison at each reported radius."""

    setting: str
    other: str
    images: int
    radii: tuple[PairedRadius, ...]


def matching_setting(resolved: dict, other_resolved: dict, setting: str) -> str | None:
    """The other run's setting resolved exactly as ``setting`` is here (denoiser, σ, n, votes, noise
    level, purifier, denoiser calls) under the same n0, α and resolved precision; None when it
    has none (or ``setting`` has not been resolved yet). Both arguments are resolved.json's
    ``settings`` sections."""
    mine, theirs = record_shaping(resolved), record_shaping(other_resolved)
    spec = mine["settings"].get(setting)
    if spec is None or any(mine.get(key) != theirs.get(key) for key in SHARED):
        return None
    return next((name for name, other in theirs["settings"].items() if other == spec), None)


def compare_at(radius: float, pairs: list[tuple[dict, dict]]) -> PairedRadius:
    """The paired outcome at ``radius`` over (our record, their record) ``pairs`` of one image each."""
    outcomes = [(certified_correct(ours, radius), certified_correct(theirs, radius)) for ours, theirs in pairs]
    only_ours = sum(ours and not theirs for ours, theirs in outcomes)
    only_theirs = sum(theirs and not ours for ours, theirs in outcomes)
    both = sum(ours and theirs for ours, theirs in outcomes)
    table = [[both, only_ours], [only_theirs, len(outcomes) - both - only_ours - only_theirs]]
    difference = paired_difference([float(ours) - float(theirs) for ours, theirs in outcomes])
    return PairedRadius(radius, both + only_ours, both + only_theirs, only_ours, only_theirs, difference,
                        float(mcnemar(table, exact=True).pvalue))


def paired_setting(setting: str, other: str, records: list[dict], other_records: list[dict],
                   radii: tuple[float, ...]) -> PairedSetting:
    """``setting``'s records paired with ``other``'s by dataset index, compared at ``radii``."""
    theirs = {int(r["dataset_index"]): r for r in other_records if r["setting"] == other}
    pairs = [(r, theirs[int(r["dataset_index"])]) for r in records
             if r["setting"] == setting and int(r["dataset_index"]) in theirs]
    return PairedSetting(setting, other, len(pairs), tuple(compare_at(radius, pairs) for radius in radii))
