"""SmoothAdv (Salman et al. 2019, "Provably robust deep learning via adversarially trained
smoothed classifiers"): L2 PGD on the smoothed classifier itself.

The smoothed classifier's soft form is F(x) = E_δ[softmax(f(x + δ))], δ ~ N(0, σ²I) in [0, 1]
pixel units, with f the base classifier's differentiable probabilities (for denoised smoothing:
the victim behind the denoiser, gradients through the denoiser exact). Each step estimates F at
the iterate on ``m`` fresh noise draws (EOT) and ascends the cross-entropy -log F_y(x): its L2
step direction equals that of -F_y (the gradient differs by the positive factor 1/F_y), so the
draws run in chunks of any size with the exact gradient. The iterate kept per sample is the one
of lowest estimated F_y; ``probability`` reports that estimate (on the attacker's own draws, a
minimum of noisy estimates: the scorer's draws, which the attacker never sees, judge it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..seeding import derive_seed
from ..validation import check_labels, check_unit_images, check_whole
from .base import parse_epsilon
from .pgd import PGDConfig, ascent_direction, project, random_point


class SoftClassifier(Protocol):
    """What SmoothAdv needs of a base classifier: noisy images (N x C x H x W, pixel units) to
    class probabilities (N x K), differentiable; ``reseed`` for noise of its own is optional."""

    def probabilities(self, noisy: torch.Tensor) -> torch.Tensor: ...


@dataclass
class SmoothAdvConfig:
    """``epsilon``: the L2 radius (pixel units; fractions such as ``128/255``); ``steps`` PGD
    steps of ``step_size`` (default 2.5 ε / steps, as ``pgd``'s); ``m`` noise draws per step
    (fresh each step); ``restarts``: the first from the image itself, the others from random
    points of the ball, the best iterate over all kept."""

    epsilon: float | str = "128/255"
    steps: int = 20
    step_size: float | None = None
    m: int = 8
    restarts: int = 1

    def __post_init__(self) -> None:
        try:
            self.epsilon = parse_epsilon(self.epsilon)
        except (ValueError, ZeroDivisionError) as error:
            raise ValueError(f"epsilon must be a number or a fraction such as 128/255, got {self.epsilon!r}") from error
        if not 0 < self.epsilon < float("inf"):
            raise ValueError(f"epsilon must be positive, got {self.epsilon!r}")
        for name in ("steps", "m", "restarts"):
            check_whole(name, getattr(self, name), 1)
        if self.step_size is not None and not (isinstance(self.step_size, (int, float)) and self.step_size > 0):
            raise ValueError(f"step_size must be positive (or null: 2.5 epsilon / steps), got {self.step_size!r}")

    @property
    def pgd(self) -> PGDConfig:
        """The L2 PGD settings whose step size, steps and ball SmoothAdv shares."""
        return PGDConfig(norm="l2", eps=self.epsilon, steps=self.steps, step_size=self.step_size)


@dataclass
class SmoothAdvResult:
    """Per sample: the example kept and its smoothed true-class probability F_y estimated on the
    attacker's draws (the lowest of its iterates')."""

    examples: torch.Tensor
    probability: torch.Tensor


class SmoothAdv:
    """SmoothAdv at smoothing noise ``sigma`` (pixel units); ``batch_size`` (sample, draw) rows
    per call of the base classifier (memory: a call keeps its graph for the backward pass)."""

    def __init__(self, config: SmoothAdvConfig, sigma: float, batch_size: int = 64) -> None:
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        check_whole("batch_size", batch_size, 1)
        self.config = config
        self.sigma = float(sigma)
        self.batch_size = batch_size

    @property
    def draws_per_sample(self) -> int:
        """Noisy copies the base classifier classifies per sample: (steps + 1) x m per restart."""
        return self.config.restarts * (self.config.steps + 1) * self.config.m

    def perturb(self, base: SoftClassifier, images: torch.Tensor, labels: torch.Tensor, seed: int) -> SmoothAdvResult:
        """Examples within ε (L2) of ``images`` and in [0, 1]; every stream (the smoothing noise,
        the base classifier's own, the random starts) is derived from ``seed`` alone."""
        check_unit_images(images)
        config, pgd = self.config, self.config.pgd
        noise = torch.Generator().manual_seed(derive_seed(seed, "smoothing-noise"))
        reseed = getattr(base, "reseed", None)
        if reseed is not None:
            reseed(derive_seed(seed, "base"))
        best = images.detach().clone()
        best_probability = torch.full((len(images),), float("inf"), device=images.device)
        for restart in range(config.restarts):
            delta = torch.zeros_like(images) if restart == 0 else random_point(
                images, pgd, torch.Generator().manual_seed(derive_seed(seed, "start", restart)))
            for step in range(config.steps + 1):
                x = (images + delta).detach()
                probability, gradient = self.true_probability(base, x, labels, noise, step < config.steps)
                better = probability < best_probability
                best = torch.where(better.view(-1, *[1] * (x.ndim - 1)), x, best)
                best_probability = torch.where(better, probability, best_probability)
                if step < config.steps:  # descend F_y: ascend the cross-entropy -log F_y
                    delta = project(delta - pgd.alpha * ascent_direction(gradient, "l2"), images, "l2", pgd.eps)
        return SmoothAdvResult(best, best_probability)

    def true_probability(self, base: SoftClassifier, x: torch.Tensor, labels: torch.Tensor,
                         noise: torch.Generator, need_gradient: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """F_y(x) per sample estimated on ``m`` draws from ``noise`` (drawn on the CPU: the same
        draws on any device), and its gradient with respect to ``x`` (None if not needed)."""
        m = self.config.m
        draws = (torch.randn((m, *x.shape), generator=noise) * self.sigma).to(x.device, x.dtype)
        x = x.detach().requires_grad_(need_gradient)
        total = torch.zeros(len(x), device=x.device)
        gradient = torch.zeros_like(x) if need_gradient else None
        per_call = max(1, self.batch_size // len(x))
        for first in range(0, m, per_call):
            chunk = draws[first:first + per_call]
            with torch.set_grad_enabled(need_gradient):
                noisy = (x.unsqueeze(0) + chunk).flatten(0, 1)
                probabilities = base.probabilities(noisy).view(len(chunk), len(x), -1)
                check_labels(labels, len(x), probabilities.shape[-1])
                true = probabilities.gather(2, labels.view(1, -1, 1).expand(len(chunk), -1, 1)).sum((0, 2))
            if need_gradient:
                gradient += torch.autograd.grad(true.sum(), x)[0]
            total += true.detach().float()
        return total / m, gradient
