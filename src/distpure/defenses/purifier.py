"""The purification defence: forward-diffuse the input to t*, then reverse to 0 with guidance.

Differentiable end to end (the guidance gradient too, by double backward), seeded, batched,
and optionally checkpointed per reverse step so that exact gradients through long reverse
processes fit in memory.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Iterator

import torch
from torch import nn

from ..devices import autocast
from ..models.diffusion import DiffusionModel
from ..sampling.reverse import StepCoefficients, predict_x0, reverse_step, step_coefficients
from ..sampling.schedule import forward_diffuse, resolve_t_star, reverse_timesteps
from ..validation import check_unit_images
from .guidance import Guidance, GuidanceState, build_guidance
from .recompute import recomputed_in_backward


@dataclass
class PurifierConfig:
    """How to purify. ``guidance`` is ``none`` (DiffPure), ``victim`` (the paper), ``mse`` (GDMP)
    or a ``+`` combination; ``num_steps=None`` runs every DDPM step from t*.

    Speed options that do not change the defence: ``precision`` (autocast: bf16 on CPU, bf16 or
    fp16 on CUDA), ``channels_last`` (NHWC convolutions; faster on CUDA tensor cores, no faster on
    this CPU; converts the diffusion model's weights in place) and ``compile`` (``torch.compile``
    the denoiser once per process)."""

    t_star: int | float = 100
    num_steps: int | None = 10
    eta: float = 1.0
    guidance: str = "victim"
    victim_scale: float = 3.0
    mse_scale: float = 0.5
    schedule: str = "constant"
    target: str = "hard"
    guidance_through_denoiser: bool = False
    clip_x0: bool = True
    precision: str = "bf16"
    channels_last: bool = False
    compile: bool = False
    batch_size: int = 256
    checkpoint_steps: bool = False
    seed: int = 0
    frozen_noise: bool = False


@dataclass
class PurificationNoise:
    """All randomness of one purification: forward noise, per-step noise, GDMP target noise."""

    forward: torch.Tensor
    steps: torch.Tensor
    targets: torch.Tensor


class Purifier(nn.Module):
    """Maps images in [0, 1] to purified images in [0, 1] (N x C x H x W)."""

    def __init__(self, diffusion: DiffusionModel, config: PurifierConfig | None = None,
                 victim: nn.Module | None = None, guidance: Guidance | None = None) -> None:
        super().__init__()
        self.config = config or PurifierConfig()
        self.diffusion = diffusion.eval().requires_grad_(False)
        if self.config.channels_last:
            self.diffusion.to(memory_format=torch.channels_last)
        self.guidance_victim = victim
        self._custom_guidance = guidance is not None
        self.guidance = guidance if guidance is not None else build_guidance(
            self.config.guidance, victim, victim_scale=self.config.victim_scale,
            mse_scale=self.config.mse_scale, schedule=self.config.schedule,
            target=self.config.target, precision=self.config.precision)
        self.t_star = resolve_t_star(self.config.t_star, diffusion.num_train_timesteps)
        self.timesteps = reverse_timesteps(self.t_star, self.config.num_steps)
        self._generator = torch.Generator().manual_seed(self.config.seed)

    def variant(self, **overrides) -> "Purifier":
        """The same defence with some settings changed (e.g. checkpointing for an attack, frozen
        noise, fewer steps for a surrogate); shares the diffusion model and the victim."""
        guidance = self.guidance if self._custom_guidance else None
        return Purifier(self.diffusion, replace(self.config, **overrides), self.guidance_victim, guidance)

    def reseed(self, seed: int) -> None:
        """Restart the noise stream: purifications after this are reproducible from ``seed``."""
        self._generator.manual_seed(seed)

    def forward(self, images: torch.Tensor, noise: PurificationNoise | None = None) -> torch.Tensor:
        """Purify ``images`` in chunks of ``batch_size``; ``noise`` fixes the randomness if given.
        Any float dtype is accepted; the work and the output are in the diffusion model's dtype."""
        _check_images(images, self.diffusion)
        images = images.to(next(self.diffusion.parameters()).dtype)
        if noise is not None:
            return self._purify(images, noise)
        generator = (torch.Generator().manual_seed(self.config.seed)
                     if self.config.frozen_noise else self._generator)
        chunks = images.split(self.config.batch_size)
        return torch.cat([self._purify(chunk, self.draw_noise(chunk.shape, generator))
                          for chunk in chunks])

    def draw_noise(self, shape: torch.Size, generator: torch.Generator) -> PurificationNoise:
        """Draw every noise tensor one purification of a batch of ``shape`` needs (on CPU, so
        that the same seed gives the same noise on any device)."""
        steps = len(self.timesteps)
        has_targets = self.guidance is not None and self.guidance.uses_target_noise
        draw = lambda *dims: torch.randn(*dims, generator=generator)  # noqa: E731
        return PurificationNoise(draw(*shape), draw(steps, *shape),
                                 draw(steps, *shape) if has_targets else torch.zeros(steps, 1, 1, 1, 1))

    def _purify(self, images: torch.Tensor, noise: PurificationNoise) -> torch.Tensor:
        device = images.device
        x_input = images * 2.0 - 1.0
        alphas_cumprod = self.diffusion.alphas_cumprod.to(device)
        x = forward_diffuse(x_input, alphas_cumprod[self.t_star], noise.forward.to(device))
        for index, (t, t_prev) in enumerate(self._step_pairs()):
            c = step_coefficients(alphas_cumprod, t, t_prev)
            progress = index / max(1, len(self.timesteps) - 1)
            step = partial(self._reverse_step, step_noise=noise.steps[index].to(device),
                           target_noise=noise.targets[index].to(device), t=t, c=c, progress=progress)
            if self.config.checkpoint_steps and torch.is_grad_enabled():
                x = recomputed_in_backward(step, x, x_input)
            else:
                x = step(x, x_input)
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

    def _step_pairs(self) -> Iterator[tuple[int, int]]:
        return zip(self.timesteps, [*self.timesteps[1:], -1])

    def _reverse_step(self, x_t: torch.Tensor, x_input: torch.Tensor, step_noise: torch.Tensor,
                      target_noise: torch.Tensor, t: int, c: StepCoefficients,
                      progress: float) -> torch.Tensor:
        eps, variance = self._guided_prediction(x_t, x_input, target_noise, t, c, progress)
        return reverse_step(x_t, eps, c, step_noise, self.config.eta, variance, self.config.clip_x0)

    def _guided_prediction(self, x_t: torch.Tensor, x_input: torch.Tensor, target_noise: torch.Tensor,
                           t: int, c: StepCoefficients, progress: float
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ε, learned variance or None) with the guidance shift applied to ε.

        When gradients to the input are wanted (an attack), the shift is built with
        ``create_graph`` so the attacker differentiates through it too.
        """
        if self.guidance is None:
            return self._denoise(x_t, t)
        differentiable = torch.is_grad_enabled() and x_t.requires_grad
        through_denoiser = self.config.guidance_through_denoiser
        with torch.enable_grad():
            x_view = x_t.clone() if differentiable else x_t.detach().requires_grad_(True)
            with torch.set_grad_enabled(differentiable or through_denoiser):
                eps, variance = self._denoise(x_view if through_denoiser else x_t, t)
            x0_hat = predict_x0(x_view, eps, c.alpha_bar, self.config.clip_x0)
            state = GuidanceState(x_view, x0_hat, x_input, c.alpha_bar, progress, target_noise)
            log_likelihood = self.guidance.weighted_log_likelihood(state).sum()
            gradient, = torch.autograd.grad(log_likelihood, x_view, create_graph=differentiable)
        guided = eps - (1.0 - c.alpha_bar).sqrt() * gradient
        return (guided, variance) if differentiable else (guided.detach(), variance)

    def _denoise(self, x_t: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        timestep = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        if self.config.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with autocast(x_t.device, self.config.precision):
            output = (_compiled(self.diffusion) if self.config.compile else self.diffusion)(x_t, timestep)
        output = output.to(x_t.dtype).contiguous()
        channels = self.diffusion.image_channels
        if self.diffusion.learned_variance:
            return output[:, :channels], output[:, channels:]
        return output, None


def _compiled(diffusion: DiffusionModel) -> nn.Module:
    """``torch.compile(diffusion)``, made once and kept on the model (outside its submodules, so
    state dicts are unchanged) so that every purifier variant shares the compiled code."""
    if "_compiled" not in diffusion.__dict__:
        object.__setattr__(diffusion, "_compiled", torch.compile(diffusion))
    return diffusion.__dict__["_compiled"]


def _check_images(images: torch.Tensor, diffusion: DiffusionModel) -> None:
    """Refuse inputs the diffusion model cannot purify, naming what is wrong."""
    check_unit_images(images)
    if images.ndim != 4:
        raise ValueError(f"expected images of shape N x C x H x W, got {tuple(images.shape)}")
    if images.shape[1] != diffusion.image_channels:
        raise ValueError(f"images have {images.shape[1]} channels; the diffusion model "
                         f"expects {diffusion.image_channels}")
    size = diffusion.sample_size
    if tuple(images.shape[2:]) != (size, size):
        raise ValueError(f"images are {images.shape[2]}x{images.shape[3]}; the diffusion model "
                         f"works at {size}x{size} (resize or crop first)")
