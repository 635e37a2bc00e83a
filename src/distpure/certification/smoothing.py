"""Randomized smoothing: CERTIFY and PREDICT of Cohen, Rosenfeld & Kolter 2019 around any base
classifier that maps noisy images to class labels.

The smoothed classifier g(x) = argmax_c P(f(x + δ) = c), δ ~ N(0, σ²I), with x in [0, 1] pixel
units (the noisy image is not clipped: the base classifier sees exactly x + δ). The certificate
relies only on the noise drawn here: f may be any function, randomized or not (a denoiser with
its own noise is a randomized f, and g averages over that randomness too), as long as every
draw is independent of the others.

Every draw is seeded from one per-sample seed (see ``derive_seed``), so a resumed or sharded
run gives the same counts as a straight one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Protocol

import torch

from ..seeding import derive_seed
from .statistics import certify_counts, decided, predict_p_value

class BaseClassifier(Protocol):
    """What smoothing needs of a base classifier: noisy images (N x C x H x W, pixel units) to
    labels (N); ``denoiser_calls`` per draw (0 without a denoiser) and ``reseed`` for any noise
    of its own are optional (see ``denoisers.DenoisedClassifier``)."""

    def __call__(self, noisy: torch.Tensor) -> torch.Tensor: ...


@dataclass
class CertifyResult:
    """One sample's CERTIFY. ``predicted`` is the class the n0 selection draws pick (always
    recorded); ``count`` of ``drawn`` estimation draws (of the ``n`` asked for) landed on it
    (``estimation_counts``: every class's).
    ``skipped``: the selection picked a class other than the label, so no estimation draws were
    made (such a sample is never certified-correct; ``count`` is None). ``curtailed``: drawing
    stopped early once the outcome at every reported radius was decided; then ``p_lower`` and
    ``radius`` are those of the worst completion (every remaining draw wrong), which is what
    the full run would give at every reported radius and a lower bound elsewhere."""

    predicted: int
    selection_counts: list[int]
    n0: int
    n: int
    count: int | None
    drawn: int
    p_lower: float | None
    radius: float | None
    abstained: bool
    skipped: bool = False
    curtailed: bool = False
    estimation_counts: list[int] | None = None
    denoiser_calls: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PredictResult:
    """PREDICT: the top class, or None when the binomial test's p-value exceeds α (abstain)."""

    predicted: int | None
    counts: list[int]
    p_value: float
    denoiser_calls: int = 0


class SmoothedClassifier:
    """The smoothed classifier around ``base`` at noise level ``sigma`` (pixel units).

    ``batch_size`` draws are classified per call of ``base`` (the speed setting: as large as
    memory allows). Example::

        smoothed = SmoothedClassifier(build_base_classifier(victim, diffusion, "one-shot", 0.25),
                                      num_classes=10, sigma=0.25, batch_size=500)
        result = smoothed.certify(image, n0=100, n=10_000, alpha=0.001, seed=7)
    """

    def __init__(self, base: BaseClassifier, num_classes: int, sigma: float, batch_size: int = 256,
                 device: torch.device | str | None = None) -> None:
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.base = base
        self.num_classes = num_classes
        self.sigma = float(sigma)
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else None

    @property
    def denoiser_calls_per_draw(self) -> int:
        return int(getattr(self.base, "denoiser_calls", 0))

    def class_counts(self, image: torch.Tensor, num: int, generator: torch.Generator,
                     stop: Callable[[torch.Tensor, int], bool] | None = None) -> tuple[torch.Tensor, int]:
        """(per-class counts, draws made) of ``base`` on ``num`` noisy copies of ``image``
        (C x H x W), drawn in batches from ``generator`` on the CPU (the same draws on any
        device); ``stop(counts, drawn)``, asked after each batch, may end the drawing early."""
        counts = torch.zeros(self.num_classes, dtype=torch.long)
        drawn = 0
        device = self.device or image.device
        image = image.to(device)
        while drawn < num:
            size = min(self.batch_size, num - drawn)
            noise = torch.randn((size, *image.shape), generator=generator) * self.sigma
            with torch.no_grad():
                labels = torch.as_tensor(self.base(image.unsqueeze(0) + noise.to(device, image.dtype)))
            labels = labels.reshape(-1).long().cpu()
            if len(labels) != size or not (0 <= int(labels.min()) and int(labels.max()) < self.num_classes):
                raise ValueError(f"the base classifier must return {size} labels in [0, {self.num_classes}), "
                                 f"got {labels.tolist()[:8]}...")
            counts += torch.bincount(labels, minlength=self.num_classes)
            drawn += size
            if stop is not None and drawn < num and stop(counts, drawn):
                break
        return counts, drawn

    def certify(self, image: torch.Tensor, n0: int, n: int, alpha: float, seed: int,
                label: int | None = None, skip_wrong: bool = False,
                curtail_radii: tuple[float, ...] | None = None) -> CertifyResult:
        """CERTIFY: the class the ``n0`` selection draws pick most often, and a certificate from
        ``n`` fresh estimation draws: p_lower, the one-sided Clopper-Pearson bound at ``alpha``;
        abstain below 1/2; else the radius σ·Φ⁻¹(p_lower).

        ``skip_wrong`` (needs ``label``): when only certified-correct accuracy is reported, a
        selection that picked a wrong class can never count, so its estimation draws are not made.

        ``curtail_radii``: stop drawing as soon as whether the class is certified at each of these
        radii is decided whatever the remaining draws are. This is valid because the final
        count lies between the hits so far (every remaining draw wrong) and the hits plus the
        draws remaining (every one right), p_lower and hence "certified at r" are monotone in
        the count, and the draws already made are the first ones the full run would have made
        (same seed, same order): when both extremes agree at every r, the full run agrees too.
        The result is identical at those radii; between them its radius is a lower bound."""
        selection, estimation = _generator(seed, "selection"), _generator(seed, "estimation")
        self._reseed_base(seed)
        selection_counts, _ = self.class_counts(image, n0, selection)
        predicted = int(selection_counts.argmax())
        calls = self.denoiser_calls_per_draw * n0
        common = dict(predicted=predicted, selection_counts=selection_counts.tolist(), n0=n0, n=n)
        if skip_wrong:
            if label is None:
                raise ValueError("skip_wrong needs the label (it skips samples the selection got wrong)")
            if predicted != label:
                return CertifyResult(**common, count=None, drawn=0, p_lower=None, radius=None,
                                     abstained=True, skipped=True, denoiser_calls=calls)
        stop = None
        if curtail_radii:
            radii = tuple(curtail_radii)

            def stop(counts: torch.Tensor, drawn: int) -> bool:
                return decided(int(counts[predicted]), drawn, n, alpha, self.sigma, radii)

        counts, drawn = self.class_counts(image, n, estimation, stop)
        count = int(counts[predicted])
        certificate = certify_counts(count, n, alpha, self.sigma)
        return CertifyResult(**common, count=count, drawn=drawn, p_lower=certificate.p_lower,
                             radius=certificate.radius, abstained=certificate.abstain,
                             curtailed=drawn < n, estimation_counts=counts.tolist(),
                             denoiser_calls=calls + self.denoiser_calls_per_draw * drawn)

    def predict(self, image: torch.Tensor, n: int, alpha: float, seed: int) -> PredictResult:
        """PREDICT: the most frequent class of ``n`` draws, returned only when the two-sided
        binomial test of its count against the runner-up's rejects p = 1/2 at ``alpha``
        (otherwise None: abstain). Wrong with probability at most α (Cohen et al., Theorem 2)."""
        self._reseed_base(derive_seed(seed, "predict"))
        counts, _ = self.class_counts(image, n, _generator(seed, "predict"))
        top2 = counts.topk(min(2, self.num_classes))
        top = int(top2.values[0])
        second = int(top2.values[1]) if self.num_classes > 1 else 0
        p_value = predict_p_value(top, second)
        return PredictResult(int(top2.indices[0]) if p_value <= alpha else None, counts.tolist(), p_value,
                             self.denoiser_calls_per_draw * n)

    def _reseed_base(self, seed: int) -> None:
        """Seed the base classifier's own noise (a denoiser's reverse steps), per sample."""
        reseed = getattr(self.base, "reseed", None)
        if reseed is not None:
            reseed(derive_seed(seed, "base"))


def _generator(seed: int, role: str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, role))
