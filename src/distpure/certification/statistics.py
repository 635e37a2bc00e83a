"""The statistics of randomized smoothing (Cohen, Rosenfeld & Kolter 2019), from maintained
libraries: the one-sided Clopper-Pearson bound (statsmodels) and the binomial test (SciPy).

Everything here is a pure function of counts, so that it can be checked against the reference
values of ``../shared/fixtures/smoothing/cohen_reference.json`` to round-off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import proportion_confint


@dataclass(frozen=True)
class Certificate:
    """CERTIFY's outcome from the counts: ``p_lower`` (a level-α lower bound on the smoothed
    probability of the selected class), ``abstain`` (p_lower < 1/2) and the L2 ``radius``
    σ·Φ⁻¹(p_lower) (None when abstaining)."""

    p_lower: float
    radius: float | None
    abstain: bool


def lower_confidence_bound(count: int, n: int, alpha: float) -> float:
    """The one-sided (1 - α) Clopper-Pearson lower bound on a binomial proportion: the lower end
    of the two-sided interval at level 2α, exactly as Cohen et al.'s reference code computes it."""
    _check_counts(count, n)
    return float(proportion_confint(count, n, alpha=2 * alpha, method="beta")[0])


def radius_from_bound(p_lower: float, sigma: float) -> float | None:
    """σ·Φ⁻¹(p_lower), the certified L2 radius of Cohen et al.'s Theorem 1; None (abstain) when
    p_lower < 1/2, where the selected class is not certified to be the smoothed prediction."""
    if p_lower < 0.5:
        return None
    return float(sigma * norm.ppf(p_lower))


def certify_counts(count: int, n: int, alpha: float, sigma: float) -> Certificate:
    """CERTIFY's decision from ``count`` of ``n`` estimation draws landing on the selected class."""
    p_lower = lower_confidence_bound(count, n, alpha)
    radius = radius_from_bound(p_lower, sigma)
    return Certificate(p_lower, radius, radius is None)


def predict_p_value(top_count: int, second_count: int) -> float:
    """PREDICT's two-sided binomial test of the top class's count against the runner-up's at
    p = 1/2 (``scipy.stats.binomtest``; SciPy no longer has the ``binom_test`` of the reference
    code). PREDICT abstains when the p-value exceeds α."""
    if top_count < 0 or second_count < 0 or top_count + second_count < 1:
        raise ValueError(f"counts must be whole numbers >= 0 with a positive sum, got "
                         f"{top_count} and {second_count}")
    return float(binomtest(top_count, top_count + second_count, 0.5).pvalue)


def max_certifiable_radius(n: int, alpha: float, sigma: float) -> float:
    """The largest radius ``n`` estimation draws can ever certify at σ (every draw right):
    σ·Φ⁻¹(α^(1/n)); a radius above it can never be certified, whatever the base classifier."""
    radius = radius_from_bound(lower_confidence_bound(n, n, alpha), sigma)
    return 0.0 if radius is None else radius


def certified_at(certificate: Certificate, radius: float) -> bool:
    """Whether ``certificate`` certifies its class within L2 ``radius`` (radius 0: not abstaining)."""
    return certificate.radius is not None and certificate.radius >= radius


def decided(count: int, drawn: int, n: int, alpha: float, sigma: float, radii: tuple[float, ...]) -> bool:
    """Whether, after ``count`` hits in ``drawn`` of ``n`` estimation draws, whether the selected
    class is certified at each of ``radii`` no longer depends on the remaining draws. The final
    count lies in [count, count + n - drawn] and p_lower, hence being certified at any radius,
    is monotone in it, so the two extremes decide every case between them."""
    remaining = n - drawn
    worst, best = (certify_counts(c, n, alpha, sigma) for c in (count, count + remaining))
    return all(certified_at(worst, r) == certified_at(best, r) for r in radii)


def _check_counts(count: int, n: int) -> None:
    if isinstance(n, bool) or n < 1 or count < 0 or count > n or not math.isfinite(count):
        raise ValueError(f"expected 0 <= count <= n with n >= 1, got count={count}, n={n}")
