"""Projected gradient descent under L∞ or L2, with expectation over transformation (EOT).

The model may be stochastic (a purification defence): each step averages the loss gradient over
``eot`` forward passes, and the iterate with the highest mean loss so far is kept per sample.
``momentum`` (MI-FGSM, Dong et al. 2018) also averages normalised gradients across steps, which
costs nothing and steadies the direction when single draws' gradients barely agree.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..seeding import noise_generators
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


class ProgressStore(Protocol):
    """Where an iterative attack keeps its progress after every iteration (e.g. a file), so that
    a run killed mid-attack resumes it where it stopped, with the same result."""

    def load(self) -> dict | None:
        """The progress saved last, or None."""

    def save(self, progress: dict) -> None:
        """Keep ``progress`` (tensors, numbers, strings, lists and dicts of them)."""


@dataclass
class _Iterate:
    """What PGD carries from one iteration to the next: the next iteration's index, the
    perturbation, the best iterate per sample with its score (fraction of held-out draws
    fooled, then loss) and the momentum direction."""

    step: int
    delta: torch.Tensor
    best: torch.Tensor
    best_fooled: torch.Tensor
    best_loss: torch.Tensor
    direction: torch.Tensor

    def keep_if_better(self, x: torch.Tensor, fooled: torch.Tensor, loss: torch.Tensor) -> None:
        """Out of place: a progress store may still hold the tensors it was given."""
        improved = (fooled > self.best_fooled) | ((fooled == self.best_fooled) & (loss > self.best_loss))
        self.best = torch.where(improved.view(-1, *[1] * (x.ndim - 1)), x, self.best)
        self.best_fooled = torch.where(improved, fooled, self.best_fooled)
        self.best_loss = torch.where(improved, loss, self.best_loss)


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
        config: PGDConfig | None = None, start: torch.Tensor | None = None,
        trace: list[dict] | None = None, judge: nn.Module | None = None,
        late: list[torch.Tensor] | None = None, progress: ProgressStore | None = None) -> torch.Tensor:
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
    the final examples, it shows what the last quarter gained. ``progress``, if given, keeps the
    iterate, trace, late examples and the noise streams of ``model`` and ``judge`` after every
    iteration, and an attack on the same inputs, settings, noise seeds, device type and package
    version resumes from what it holds: the result is the same as without the interruption (on
    the same machine; CUDA kernels are not bit-reproducible even uninterrupted)."""
    check_unit_images(images)
    config = config or PGDConfig()
    generators = noise_generators(model, judge)
    fingerprint = _fingerprint(images, labels, start, config, generators)
    saved = progress.load() if progress is not None else None
    trace_before, late_before = len(trace or []), len(late or [])  # saved: only what this attack adds
    if saved is not None and saved.get("fingerprint") == fingerprint:
        iterate = _restore(saved, images, generators, trace, late)
    else:
        iterate = _first_iterate(images, start, config)
    for step in range(iterate.step, config.steps):
        loss, gradient, accuracy = eot_loss_and_gradient(model, images + iterate.delta, labels, config)
        _record(trace, step, loss, accuracy)
        if config.keep_best:
            x = (images + iterate.delta).detach()
            iterate.keep_if_better(x, _fooled(judge, x, labels, config.holdout_draws), loss)
        if late is not None and step == late_iteration(config.steps):
            late.append((iterate.best if config.keep_best else images + iterate.delta).detach().clone())
        iterate.direction = config.momentum * iterate.direction + _unit_l1(gradient) if config.momentum else gradient
        iterate.delta = project(iterate.delta + config.alpha * ascent_direction(iterate.direction, config.norm),
                                images, config.norm, config.eps)
        iterate.step = step + 1
        if progress is not None:
            progress.save({"fingerprint": fingerprint, **vars(iterate), "trace": (trace or [])[trace_before:],
                           "late": (late or [])[late_before:], "generators": [g.get_state() for g in generators]})
    final = (images + iterate.delta).detach()
    if not config.keep_best or config.steps == 0:
        return final
    final_loss, _, accuracy = eot_loss_and_gradient(model, final, labels, config, need_gradient=False)
    _record(trace, config.steps, final_loss, accuracy)
    iterate.keep_if_better(final, _fooled(judge, final, labels, config.holdout_draws), final_loss)
    return iterate.best


def _first_iterate(images: torch.Tensor, start: torch.Tensor | None, config: PGDConfig) -> _Iterate:
    """Iteration 0: the warm start, a random point of the ball, or the images themselves."""
    if start is not None:
        delta = project(start.to(images) - images, images, config.norm, config.eps)
    elif config.random_start:
        delta = random_point(images, config, torch.Generator().manual_seed(config.seed))
    else:
        delta = torch.zeros_like(images)
    return _Iterate(0, delta, (images + delta).detach(), torch.full((len(images),), -1.0, device=images.device),
                    torch.full((len(images),), float("-inf"), device=images.device), torch.zeros_like(images))


def _restore(saved: dict, images: torch.Tensor, generators: list[torch.Generator],
             trace: list[dict] | None, late: list[torch.Tensor] | None) -> _Iterate:
    """The iterate ``saved`` holds, its trace and late examples put back into the caller's lists
    and the noise streams rewound to where they were."""
    for generator, state in zip(generators, saved["generators"]):
        generator.set_state(state)
    if trace is not None:
        trace.extend(saved["trace"])
    if late is not None:
        late.extend(x.to(images) for x in saved["late"])
    return _Iterate(**{f.name: saved[f.name] if f.name == "step" else saved[f.name].to(images.device)
                       for f in fields(_Iterate)})


def _fingerprint(images: torch.Tensor, labels: torch.Tensor, start: torch.Tensor | None, config: PGDConfig,
                 generators: list[torch.Generator]) -> str:
    """What an attack's progress belongs to: its inputs and settings, the seeds of the noise
    streams it draws from (which name the attacker and its batch), the device type and the
    package version (whose attack may iterate otherwise)."""
    seeds = [generator.initial_seed() for generator in generators]
    digest = hashlib.sha256(repr((config, seeds, tuple(images.shape), images.device.type, __version__)).encode())
    for tensor in (images, labels, start):
        if tensor is not None:
            digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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


def ascent_direction(gradient: torch.Tensor, norm: str) -> torch.Tensor:
    """A step's direction: the gradient's sign (L∞), or the gradient of unit L2 norm per sample."""
    if norm == "linf":
        return gradient.sign()
    flat_norm = gradient.flatten(1).norm(dim=1).clamp_min(1e-12)
    return gradient / flat_norm.view(-1, *[1] * (gradient.ndim - 1))


def project(delta: torch.Tensor, images: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """``delta`` back into the ``norm`` ε-ball and ``images + delta`` into the [0, 1] box."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        factor = (eps / norms).clamp(max=1.0)
        delta = delta * factor.view(-1, *[1] * (delta.ndim - 1))
    return ((images + delta).clamp(0.0, 1.0) - images).detach()


def random_point(images: torch.Tensor, config: PGDConfig, generator: torch.Generator) -> torch.Tensor:
    """A random start in ``config``'s ε-ball around ``images`` (uniform per coordinate for L∞, a
    uniform direction at a uniform radius for L2), inside [0, 1]."""
    noise = torch.rand(images.shape, generator=generator).to(images.device) * 2 - 1
    if config.norm == "linf":
        delta = noise * config.eps
    else:
        direction = torch.randn(images.shape, generator=generator).to(images.device)
        norms = direction.flatten(1).norm(dim=1).view(-1, *[1] * (images.ndim - 1))
        radius = torch.rand(len(images), generator=generator).to(images.device)
        radius = radius.view(-1, *[1] * (images.ndim - 1))
        delta = direction / norms * radius * config.eps
    return project(delta, images, config.norm, config.eps)
