"""Base classifiers for denoised smoothing: the victim behind a diffusion denoiser.

The smoothing noise δ ~ N(0, σ²I) is added to images in [0, 1]; the diffusion model works in
[-1, 1], where the same noise has standard deviation 2σ. A diffusion state x_t = √ᾱ x0 + √(1-ᾱ) ε
rescaled by 1/√ᾱ is x0 + √((1-ᾱ)/ᾱ) ε, so the noisy image (in [-1, 1]) times √ᾱ_t is a state of
time t when √((1-ᾱ_t)/ᾱ_t) = 2σ (Carlini et al. 2023, "(Certified!!) Adversarial Robustness for
Free!"). On a discrete time grid (DDPM, ADM) t is the grid step whose noise level is nearest 2σ;
for a continuous-time score-SDE model it is the exact time. The mapping only shapes the base
classifier: the certificate holds for any base classifier, so it never depends on the mapping
(only on the noise that ``smoothing`` actually draws).

Kinds (``DENOISER_KINDS``):
- ``none``: the victim on the noisy image (Cohen et al.'s setting, for an off-the-shelf victim a baseline);
- ``one-shot``: the victim on the model's one-step estimate x̂0 at that time (one denoiser call);
- ``multistep``: the victim after the purifier's reverse sampler run from that time in ``steps``
  steps, never diffusing forward again (the smoothing noise is the only forward noise);
- ``guided``: the same with the paper's victim guidance (``guidance_scale``);
- ``voted``: ``votes`` independent multistep runs per noise draw, majority vote (DensePure).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..defenses.purifier import Purifier
from ..defenses.recommended import recommended_purifier_config
from ..devices import autocast
from ..models.noise_predictor import NoisePredictor
from ..sampling.reverse import predict_x0
from ..validation import check_choice

DENOISER_KINDS = ("none", "one-shot", "multistep", "guided", "voted")


@dataclass(frozen=True)
class NoiseLevel:
    """Where smoothing noise σ (pixel units) lands on a diffusion model's time axis: the time
    ``label`` its network is called with, the ``alpha_bar`` there, and the nearest integer
    ``timestep`` of its discrete grid (where the multistep samplers start)."""

    sigma: float
    label: int | float
    alpha_bar: float
    timestep: int
    continuous: bool

    @property
    def model_noise(self) -> float:
        """√((1-ᾱ)/ᾱ) at the chosen time: 2σ exactly in continuous time, nearly on a grid."""
        return math.sqrt((1.0 - self.alpha_bar) / self.alpha_bar)


def is_continuous_time(diffusion: NoisePredictor) -> bool:
    """Whether the network takes continuous time labels (score-SDE's NCSN++), so that σ maps to
    an exact time; networks trained on integer steps (DDPM, ADM) take the nearest step."""
    from ..models.ncsnpp import ScoreSDEModel

    return isinstance(diffusion, ScoreSDEModel)


def nearest_timestep(diffusion: NoisePredictor, sigma: float) -> int:
    """The discrete step t whose noise level √((1-ᾱ_t)/ᾱ_t) is nearest 2σ."""
    alpha_bar = diffusion.alphas_cumprod.detach().double().cpu()
    levels = ((1.0 - alpha_bar) / alpha_bar).sqrt()
    return int((levels - 2.0 * sigma).abs().argmin())


def noise_level(diffusion: NoisePredictor, sigma: float) -> NoiseLevel:
    """σ on ``diffusion``'s time axis (see the module's docstring)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    step = nearest_timestep(diffusion, sigma)
    if is_continuous_time(diffusion):
        sde = diffusion.sde  # ᾱ(t) = 1 / (1 + 4σ²): solve β_min t + ½ (β_max - β_min) t² = log(1 + 4σ²)
        spread, log_ratio = sde.beta_max - sde.beta_min, math.log1p(4.0 * sigma**2)
        time = (-sde.beta_min + math.sqrt(sde.beta_min**2 + 2.0 * spread * log_ratio)) / spread
        if not 0.0 < time <= 1.0:
            raise ValueError(f"sigma {sigma} is beyond the noise of the diffusion model's last time")
        return NoiseLevel(sigma, diffusion.sde_time_label(time), sde.alpha_bar(time), step, True)
    return NoiseLevel(sigma, step, float(diffusion.alphas_cumprod[step]), step, False)


class OneShotDenoiser(nn.Module):
    """Noisy images (pixel units) to the diffusion model's one-step estimate x̂0 in [0, 1]."""

    def __init__(self, diffusion: NoisePredictor, sigma: float, precision: str = "auto") -> None:
        super().__init__()
        self.diffusion = diffusion.eval().requires_grad_(False)
        self.level = noise_level(diffusion, sigma)
        self.precision = precision

    denoiser_calls = 1

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        x_t = math.sqrt(self.level.alpha_bar) * (noisy.to(_dtype(self.diffusion)) * 2.0 - 1.0)
        labels = torch.full((len(x_t),), self.level.label, device=x_t.device)
        with autocast(x_t.device, self.precision):
            eps = self.diffusion.predict_noise(x_t, labels)
        alpha_bar = torch.tensor(self.level.alpha_bar, dtype=x_t.dtype, device=x_t.device)
        return (predict_x0(x_t, eps.to(x_t.dtype), alpha_bar) + 1.0) / 2.0


class ReverseDenoiser(nn.Module):
    """Noisy images (pixel units) to the purifier's reverse run from the step nearest σ, started
    from the scaled noisy image itself (no forward diffusion). Its own step noise is seeded by
    ``reseed``."""

    def __init__(self, purifier: Purifier, sigma: float) -> None:
        super().__init__()
        self.purifier = purifier
        self.level = noise_level(purifier.diffusion, sigma)
        if purifier.t_star != self.level.timestep:
            raise ValueError(f"the purifier starts at step {purifier.t_star}, not at σ {sigma}'s "
                             f"step {self.level.timestep}")
        # the reverse steps start from the grid step, so scale by its ᾱ (not a continuous one)
        self.scale = math.sqrt(float(purifier.diffusion.alphas_cumprod[self.level.timestep]))

    @property
    def denoiser_calls(self) -> int:
        return len(self.purifier.timesteps)

    def reseed(self, seed: int) -> None:
        self.purifier.reseed(seed)

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        x_input = noisy.to(_dtype(self.purifier.diffusion)) * 2.0 - 1.0
        return self.purifier.reverse_from(self.scale * x_input, x_input)


class DenoisedClassifier(nn.Module):
    """A base classifier: noisy images to the victim's labels on the denoised images; with
    ``votes`` > 1, the majority of that many denoisings per image (ties to the lower class).
    ``probabilities`` is its differentiable soft form (what an attack on the smoothed
    classifier ascends); the labels are the argmax of the same logits."""

    def __init__(self, victim: nn.Module, denoiser: nn.Module | None, votes: int = 1) -> None:
        super().__init__()
        if votes < 1:
            raise ValueError(f"votes must be at least 1, got {votes}")
        self.victim = victim
        self.denoiser = denoiser
        self.votes = votes

    @property
    def denoiser_calls(self) -> int:
        """Denoiser (network) calls per noise draw."""
        return int(getattr(self.denoiser, "denoiser_calls", 0)) * self.votes

    def reseed(self, seed: int) -> None:
        """Seed the denoiser's own noise (if it has any): per sample, for reproducible records."""
        reseed = getattr(self.denoiser, "reseed", None)
        if reseed is not None:
            reseed(seed)

    def denoise(self, noisy: torch.Tensor) -> torch.Tensor:
        """One denoising of the noisy images, clamped to [0, 1]: what the victim sees (the noisy
        images themselves without a denoiser); also the batches a fine-tuned victim trains on."""
        if self.denoiser is None:
            return noisy
        return self.denoiser(noisy).clamp(0.0, 1.0)

    def vote_logits(self, noisy: torch.Tensor) -> torch.Tensor:
        """The victim's logits on each of the ``votes`` denoisings of every image (N x votes x K),
        differentiable (gradients through the denoiser are exact)."""
        return torch.stack([self.victim(self.denoise(noisy)) for _ in range(self.votes)], dim=1)

    def probabilities(self, noisy: torch.Tensor) -> torch.Tensor:
        """The victim's softmax, averaged over the votes (a smooth stand-in for their majority)."""
        return self.vote_logits(noisy).float().softmax(-1).mean(1)

    @torch.no_grad()
    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        logits = self.vote_logits(noisy)
        votes = logits.argmax(-1)
        if self.votes == 1:
            return votes[:, 0]
        tallies = torch.zeros(len(votes), logits.shape[-1], dtype=torch.long, device=votes.device)
        tallies.scatter_add_(1, votes, torch.ones_like(votes))
        return tallies.argmax(1)  # the first maximum: ties go to the lower class


def build_base_classifier(victim: nn.Module, diffusion: NoisePredictor | None, kind: str, sigma: float,
                          steps: int = 4, guidance_scale: float | None = None, votes: int = 1,
                          precision: str = "auto", dataset: str = "cifar10",
                          purifier: Mapping | None = None) -> DenoisedClassifier:
    """The victim behind denoiser ``kind`` (``DENOISER_KINDS``) at smoothing noise ``sigma``.

    The reverse kinds use the purifier (``defenses.purifier``) with ``dataset``'s recommended
    settings, overridden by ``purifier`` (e.g. ``{"eta": 0.0}``), started at σ's step with
    ``steps`` reverse steps; ``guided`` uses victim guidance at ``guidance_scale`` (default:
    the recommended scale); ``votes`` applies to ``voted``."""
    check_choice("denoiser kind", kind, DENOISER_KINDS)
    if kind == "none":
        return DenoisedClassifier(victim, None)
    if diffusion is None:
        raise ValueError(f"denoiser kind {kind!r} needs a diffusion model")
    if kind == "one-shot":
        return DenoisedClassifier(victim, OneShotDenoiser(diffusion, sigma, precision))
    level = noise_level(diffusion, sigma)
    if level.timestep < 1 or steps > level.timestep:
        raise ValueError(f"sigma {sigma} maps to step {level.timestep} of the diffusion model: a reverse "
                         f"run of {steps} steps needs at least as many steps (1 or more)")
    options = {"precision": precision, **(purifier or {}), "t_star": level.timestep, "num_steps": steps}
    guidance = "victim" if kind == "guided" else "none"
    if kind == "guided" and guidance_scale is not None:
        options["victim_scale"] = guidance_scale
    config = recommended_purifier_config(dataset, guidance, **options)
    if config.sampler != "ddpm":
        raise ValueError("a reverse denoiser runs the ddpm sampler (from a grid step), not "
                         f"sampler {config.sampler!r}")
    denoiser = ReverseDenoiser(Purifier(diffusion, config, victim=victim), sigma)
    return DenoisedClassifier(victim, denoiser, votes if kind == "voted" else 1)


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
