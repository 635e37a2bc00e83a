"""Projected gradient descent under L∞ or L2, with expectation over transformation (EOT).

The model may be stochastic (a purification defence): each step averages the loss gradient over
``eot`` forward passes, and the iterate with the highest mean loss so far is kept per sample.
``momentum`` (MI-FGSM, Dong et al. 2018) also averages normalised gradients across steps, which
costs nothing and steadies the direction when single draws' gradients barely agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import check_choice, check_labels, check_unit_images

NORMS = ("linf", "l2")
LOSSES = ("ce", "margin", "dlr")


@dataclass
class PGDConfig:
    """``step_size=None`` means 2.5 ε / steps (Madry et al.). ``eot_batch`` EOT draws run as one
    batched forward and backward (the batch repeated), so a step of EOT 8 with ``eot_batch=8``
    is one pass over 8x the images: faster where a batch does not fill the machine, at 8x the
    activation memory. ``holdout_draws`` > 0 (with a ``judge``) keeps, per sample, the iterate
    that fools the most of that many held-out draws (then the highest loss), instead of the
    highest loss on the attacker's own noisy draws."""

    norm: Literal["linf", "l2"] = "linf"
    eps: float = 8 / 255
    steps: int = 20
    step_size: float | None = None
    eot: int = 1
    loss: Literal["ce", "margin"] = "ce"
    random_start: bool = True
    keep_best: bool = True
    momentum: float = 0.0
    eot_batch: int = 1
    holdout_draws: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("norm", self.norm, NORMS)
        if self.eot_batch < 1 or self.holdout_draws < 0:
            raise ValueError(f"eot_batch must be at least 1 and holdout_draws not negative, got "
                             f"{self.eot_batch} and {self.holdout_draws}")
        check_choice("attack loss", self.loss, LOSSES)
        if self.eps < 0 or self.steps < 0 or self.eot < 1:
            raise ValueError("eps and steps must be non-negative and eot at least 1, got "
                             f"eps={self.eps}, steps={self.steps}, eot={self.eot}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / max(1, self.steps)


def attack_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample loss the attacker maximises: cross-entropy, the CW margin max_{j≠y} z_j - z_y,
    or Croce & Hein's DLR, the margin divided by z_π1 - z_π3 (invariant to the logits' scale)."""
    check_labels(labels, len(logits), logits.shape[-1])
    check_choice("attack loss", kind, LOSSES)
    logits = logits.float()
    if kind == "ce":
        return F.cross_entropy(logits, labels, reduction="none")
    true = logits.gather(1, labels[:, None]).squeeze(1)
    margin = logits.scatter(1, labels[:, None], float("-inf")).amax(1) - true
    if kind == "margin":
        return margin
    ranked = logits.sort(dim=1, descending=True).values
    return margin / (ranked[:, 0] - ranked[:, 2] + 1e-12)


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
        config: PGDConfig | None = None, start: torch.Tensor | None = None,
        trace: list[dict] | None = None, judge: nn.Module | None = None,
        late: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Adversarial examples within the ε-ball of ``images`` (clipped to [0, 1]); images outside
    [0, 1] or labels outside the model's outputs are a ValueError (labels: at the first forward).

    ``start`` (e.g. a transfer attack's examples) is the first iterate instead of a random point,
    projected into the ball; warm starts keep a costly adaptive attack from wasting its steps.
    ``trace``, if given, receives per iterate (and for the final one) the attacker's mean loss
    and its accuracy on its own EOT draws: the convergence curve of the attack. ``judge`` (the
    defence with noise of its own) picks the best iterate when ``holdout_draws`` is set. A model
    that sets a per-row ``auxiliary_loss`` in its forward (``deviation.DeviatedReconstruction``)
    has it added to the loss the steps ascend; iterates are still kept, and traced, by the
    classification loss. ``late``, if given, receives what the attack would have returned had it
    stopped at the start of its last quarter (iteration ``late_iteration(steps)``): scored beside
    the final examples, it shows what the last quarter gained."""
    check_unit_images(images)
    config = config or PGDConfig()
    generator = torch.Generator().manual_seed(config.seed)
    if start is not None:
        delta = _project(start.to(images) - images, images, config)
    elif config.random_start:
        delta = _random_start(images, config, generator)
    else:
        delta = torch.zeros_like(images)
    best = (images + delta).detach()
    best_score = (torch.full((len(images),), -1.0, device=images.device),
                  torch.full((len(images),), float("-inf"), device=images.device))
    direction = torch.zeros_like(images)

    def keep_if_better(x: torch.Tensor, loss: torch.Tensor) -> None:
        nonlocal best_score
        score = (_fooled(judge, x, labels, config.holdout_draws), loss)
        improved = (score[0] > best_score[0]) | ((score[0] == best_score[0]) & (score[1] > best_score[1]))
        best[improved] = x[improved]
        best_score = tuple(torch.where(improved, new, old) for new, old in zip(score, best_score))

    for step in range(config.steps):
        loss, gradient, accuracy = eot_loss_and_gradient(model, images + delta, labels, config)
        _record(trace, step, loss, accuracy)
        if config.keep_best:
            keep_if_better((images + delta).detach(), loss)
        if late is not None and step == late_iteration(config.steps):
            late.append((best if config.keep_best else images + delta).detach().clone())
        direction = config.momentum * direction + _unit_l1(gradient) if config.momentum else gradient
        delta = _project(delta + config.alpha * _ascent_direction(direction, config.norm), images, config)
    final = (images + delta).detach()
    if not config.keep_best or config.steps == 0:
        return final
    final_loss, _, accuracy = eot_loss_and_gradient(model, final, labels, config, need_gradient=False)
    _record(trace, config.steps, final_loss, accuracy)
    keep_if_better(final, final_loss)
    return best


def late_iteration(steps: int) -> int:
    """The first iteration of an attack's last quarter (as its convergence trace is read)."""
    return (3 * steps) // 4


@torch.no_grad()
def _fooled(judge: nn.Module | None, x: torch.Tensor, labels: torch.Tensor, draws: int) -> torch.Tensor:
    """Per sample, the fraction of ``draws`` judge draws that misclassify ``x`` (zeros without
    a judge, so that the loss alone decides)."""
    if judge is None or draws == 0:
        return torch.zeros(len(x), device=x.device)
    wrong = sum((judge(x).argmax(1) != labels).float() for _ in range(draws))
    return wrong / draws


def _record(trace: list[dict] | None, step: int, loss: torch.Tensor, accuracy: float) -> None:
    if trace is not None:
        trace.append({"step": step, "loss": float(loss.mean()), "accuracy": accuracy})


def eot_loss_and_gradient(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, config: PGDConfig,
                          need_gradient: bool = True) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean classification loss and mean input gradient over ``eot`` stochastic forward passes,
    and the fraction of (sample, draw) pairs the model still classifies right. The gradient is
    of the loss plus the model's ``auxiliary_loss`` where it sets one (DiffAttack's deviation);
    the loss returned, which picks the iterate kept, is the classification loss alone. Draws run
    ``eot_batch`` at a time as one batch of repeated images (each row draws its own noise; the
    gradient with respect to ``x`` sums over the copies)."""
    x = x.detach().requires_grad_(need_gradient)
    total_loss = torch.zeros(len(x), device=x.device)
    total_gradient = torch.zeros_like(x)
    right = 0
    for first in range(0, config.eot, config.eot_batch):
        copies = min(config.eot_batch, config.eot - first)
        with torch.set_grad_enabled(need_gradient):
            logits = model(x.repeat(copies, *[1] * (x.ndim - 1)))
            loss = attack_loss(logits, labels.repeat(copies), config.loss)
            auxiliary = getattr(model, "auxiliary_loss", None)
        right += int((logits.detach().argmax(1) == labels.repeat(copies)).sum())
        if need_gradient:
            ascended = loss.sum() + (auxiliary.sum() if auxiliary is not None else 0.0)
            total_gradient += torch.autograd.grad(ascended, x)[0]
        total_loss += loss.detach().view(copies, len(x)).sum(0)
    return total_loss / config.eot, total_gradient / config.eot, right / (config.eot * len(x))


def _unit_l1(gradient: torch.Tensor) -> torch.Tensor:
    """Each sample's gradient divided by its mean absolute value (MI-FGSM's normalisation)."""
    scale = gradient.abs().flatten(1).mean(1).clamp_min(1e-12)
    return gradient / scale.view(-1, *[1] * (gradient.ndim - 1))


def _ascent_direction(gradient: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return gradient.sign()
    flat_norm = gradient.flatten(1).norm(dim=1).clamp_min(1e-12)
    return gradient / flat_norm.view(-1, *[1] * (gradient.ndim - 1))


def _project(delta: torch.Tensor, images: torch.Tensor, config: PGDConfig) -> torch.Tensor:
    """Back into the ε-ball and the [0, 1] box."""
    if config.norm == "linf":
        delta = delta.clamp(-config.eps, config.eps)
    else:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        factor = (config.eps / norms).clamp(max=1.0)
        delta = delta * factor.view(-1, *[1] * (delta.ndim - 1))
    return ((images + delta).clamp(0.0, 1.0) - images).detach()


def _random_start(images: torch.Tensor, config: PGDConfig, generator: torch.Generator) -> torch.Tensor:
    noise = torch.rand(images.shape, generator=generator).to(images.device) * 2 - 1
    if config.norm == "linf":
        delta = noise * config.eps
    else:
        direction = torch.randn(images.shape, generator=generator).to(images.device)
        norms = direction.flatten(1).norm(dim=1).view(-1, *[1] * (images.ndim - 1))
        radius = torch.rand(len(images), generator=generator).to(images.device)
        radius = radius.view(-1, *[1] * (images.ndim - 1))
        delta = direction / norms * radius * config.eps
    return _project(delta, images, config)
