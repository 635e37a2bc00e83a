"""Guidance for the reverse process: a log-likelihood whose gradient shifts the noise prediction.

At each reverse step a guidance term returns, per sample, log p(y | x_t) as a differentiable
function of the current state; the purifier adds ``scale(t) * ∇ log p`` to the score, i.e.
ε ← ε - sqrt(1 - ᾱ_t) · scale(t) · ∇_{x_t} log p (classifier guidance in ε-space).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import autocast
from ..validation import check_choice

#: the guidance terms ``build_guidance`` knows; a spec is ``none``, one of them, or a ``+`` sum
GUIDANCE_TERMS = ("victim", "mse")
SCHEDULES = ("constant", "linear-up", "linear-down")
#: what victim guidance follows: the victim's arg-max class at x̂0 (``hard``), its distribution
#: sharpened by a temperature (``soft``; at temperature 1 a shift of zero, see
#: ``VictimGuidance``), or, for an attacker's copy, ``hard`` with its shift held constant in
#: the derivative (``straight-through``)
TARGETS = ("hard", "soft", "straight-through")


@dataclass
class GuidanceState:
    """What a guidance term may read at one reverse step (images in [-1, 1])."""

    x_t: torch.Tensor
    x0_hat: torch.Tensor
    x_input: torch.Tensor
    alpha_bar: torch.Tensor
    progress: float
    noise: torch.Tensor


class Guidance(nn.Module):
    """A guidance term: ``log_likelihood`` per sample, times a scale that may vary over t."""

    #: whether ``GuidanceState.noise`` (fresh noise to diffuse the input with) is read
    uses_target_noise: bool = False

    def __init__(self, scale: float = 1.0,
                 schedule: Literal["constant", "linear-up", "linear-down"] = "constant") -> None:
        super().__init__()
        check_choice("guidance schedule", schedule, SCHEDULES)
        self.scale = float(scale)
        self.schedule = schedule

    def scale_at(self, progress: float) -> float:
        """Scale at ``progress`` ∈ [0, 1] (0 at t*, 1 at the last step).

        ``linear-up`` grows towards t = 0 (where x̂0 is reliable), ``linear-down`` shrinks.
        """
        if self.schedule == "linear-up":
            return self.scale * progress
        if self.schedule == "linear-down":
            return self.scale * (1.0 - progress)
        return self.scale

    def log_likelihood(self, state: GuidanceState) -> torch.Tensor:
        raise NotImplementedError

    def weighted_log_likelihood(self, state: GuidanceState) -> torch.Tensor:
        """``scale(t) * log p`` per sample: the quantity whose x_t-gradient shifts the score."""
        return self.scale_at(state.progress) * self.log_likelihood(state)

    def gradient(self, state: GuidanceState, create_graph: bool = False) -> torch.Tensor:
        """The shift of the score, ∇_{x_t} of ``scale(t) * log p``; with ``create_graph`` it stays
        differentiable in x_t (an attack)."""
        value, = torch.autograd.grad(self.weighted_log_likelihood(state).sum(), state.x_t,
                                     create_graph=create_graph)
        return value


class VictimGuidance(Guidance):
    """The paper's guidance: the protected classifier's log-probability of the class it assigns
    to the current clean-image estimate x̂0 (``hard``), or its mean under the victim's
    distribution sharpened to q = softmax(logits / ``soft_temperature``) (``soft``).

    At temperature 1 the ``soft`` target shifts nothing: Σ_c p_c ∇ log p_c = ∇ Σ_c p_c = 0, so
    it purifies as unguided DiffPure (up to rounding), and its exact derivative is DiffPure's.
    (Before 0.2 an attack differentiated it with the weights held constant, a derivative of a
    term whose value is zero, and found it far more robust than DiffPure: an artefact of that
    gradient.) Below 1 the shift Σ_c q_c ∇ log p_c leans toward the likelier classes; towards 0
    it nears the hard target's, continuously: a relaxation an attacker can differentiate.

    ``straight-through`` purifies exactly as ``hard``; an attacker who differentiates the
    purification gets, for the guidance's shift, the soft shift's derivative, which is none:
    the hard shift is held constant (the hard target jumps where its arg-max flips)."""

    def __init__(self, victim: nn.Module, scale: float = 3.0, schedule: str = "constant",
                 target: Literal["hard", "soft", "straight-through"] = "hard",
                 precision: str = "auto", soft_temperature: float = 1.0) -> None:
        super().__init__(scale, schedule)
        check_choice("victim guidance target", target, TARGETS)
        self.victim = victim
        self.target = target
        self.precision = precision
        self.soft_temperature = float(soft_temperature)

    def log_likelihood(self, state: GuidanceState) -> torch.Tensor:
        """log p(arg-max class | x̂0), or its mean under the (detached) sharpened distribution."""
        logits = self._logits(state)
        log_probs = F.log_softmax(logits, dim=1)
        if self.target == "soft":
            return (self._soft_weights(logits).detach() * log_probs).sum(dim=1)
        return log_probs.gather(1, log_probs.detach().argmax(dim=1, keepdim=True)).squeeze(1)

    def gradient(self, state: GuidanceState, create_graph: bool = False) -> torch.Tensor:
        """The hard target's shift is the gradient of ``log_likelihood``. The soft target's,
        Σ_c q_c ∇ log p_c, has the same value, but in an attack's graph its weights q_c stay
        attached, so that its derivative follows the target distribution as it moves too (the
        detached mean's gradient drops that part). Straight-through: the hard shift, held
        constant in an attack's derivative."""
        if self.target == "soft":
            return self._soft_shift(state, create_graph)
        if self.target == "hard" or not create_graph:
            return super().gradient(state, create_graph)
        # create_graph changes the kernels, so the value is taken with it too: bit-identical
        return super().gradient(state, create_graph=True).detach()

    def _soft_shift(self, state: GuidanceState, create_graph: bool) -> torch.Tensor:
        """scale(t) · Σ_c q_c ∇_{x_t} log p_c(x̂0): one vector-Jacobian product weighted by q."""
        logits = self._logits(state)
        weights = self.scale_at(state.progress) * self._soft_weights(logits)
        shift, = torch.autograd.grad(F.log_softmax(logits, dim=1), state.x_t,
                                     grad_outputs=weights if create_graph else weights.detach(),
                                     create_graph=create_graph)
        return shift

    def _soft_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """q = softmax(logits / soft_temperature): the victim's distribution, sharpened below 1."""
        return F.softmax(logits / self.soft_temperature, dim=1)

    def _logits(self, state: GuidanceState) -> torch.Tensor:
        """The victim's logits at x̂0 (mapped to [0, 1]), in the state's precision."""
        images = (state.x0_hat + 1.0) / 2.0
        with autocast(images.device, self.precision):
            logits = self.victim(images)
        return logits.to(images.dtype)


class MSEGuidance(Guidance):
    """GDMP: pull x_t toward the input diffused to the same level, sqrt(ᾱ) x_in + sqrt(1-ᾱ) z.

    log p = -||x_t - x_t^in||² / (2 (1 - ᾱ_t)), so scale 1 is the Gaussian likelihood of the
    diffused input at that noise level.
    """

    uses_target_noise = True

    def __init__(self, scale: float = 0.5, schedule: str = "constant") -> None:
        super().__init__(scale, schedule)

    def log_likelihood(self, state: GuidanceState) -> torch.Tensor:
        a = state.alpha_bar
        diffused_input = a.sqrt() * state.x_input + (1.0 - a).sqrt() * state.noise
        squared = (state.x_t - diffused_input).pow(2).flatten(1).sum(1)
        return -squared / (2.0 * (1.0 - a))


class CombinedGuidance(Guidance):
    """A sum of guidance terms, each with its own scale and schedule."""

    def __init__(self, terms: Sequence[Guidance]) -> None:
        super().__init__()
        self.terms = nn.ModuleList(terms)
        self.uses_target_noise = any(term.uses_target_noise for term in terms)

    def gradient(self, state: GuidanceState, create_graph: bool = False) -> torch.Tensor:
        """The sum of the terms' shifts, each differentiated as its term defines (a soft or
        straight-through victim term is not the gradient of its log-likelihood)."""
        return sum(term.gradient(state, create_graph) for term in self.terms)


def guidance_terms(spec: str | None) -> list[str]:
    """The term names of a guidance spec (``victim+mse`` -> victim, mse; ``none`` -> none of
    them); an unknown name is an error naming it and the choices."""
    if spec in (None, "", "none"):
        return []
    if not isinstance(spec, str):
        raise ValueError(f"guidance must be a name such as victim or victim+mse, got {spec!r}")
    names = [name.strip() for name in spec.split("+")]
    for name in names:
        if name not in GUIDANCE_TERMS:
            raise ValueError(f"unknown guidance {name!r}; expected none, {', '.join(GUIDANCE_TERMS)} "
                             "or a '+' combination such as victim+mse")
    return names


def build_guidance(spec: str | None, victim: nn.Module | None = None, **options) -> Guidance | None:
    """Guidance from a name: ``none``, ``victim``, ``mse``, or a combination ``victim+mse``.

    ``options`` may hold ``victim_scale``, ``mse_scale``, ``schedule``, ``target``,
    ``soft_temperature``, ``precision``.
    """
    terms = [_build_term(name, victim, options) for name in guidance_terms(spec)]
    if not terms:
        return None
    return terms[0] if len(terms) == 1 else CombinedGuidance(terms)


def _build_term(name: str, victim: nn.Module | None, options: dict) -> Guidance:
    schedule = options.get("schedule", "constant")
    if name == "mse":
        return MSEGuidance(options.get("mse_scale", 0.5), schedule)
    if victim is None:
        raise ValueError("victim guidance needs the victim classifier")
    return VictimGuidance(victim, options.get("victim_scale", 3.0), schedule,
                          options.get("target", "hard"), options.get("precision", "auto"),
                          options.get("soft_temperature", 1.0))
