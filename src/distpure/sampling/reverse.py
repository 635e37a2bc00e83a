"""One reverse-diffusion step x_t -> x_{t'} (t' < t), for DDPM, strided DDPM and DDIM.

The maths is that of diffusers' ``DDPMScheduler.step`` (fixed or learned-range variance) and
``DDIMScheduler.step`` (any η); it is written out here so that the noise is an explicit input
(frozen randomness, gradient checkpointing) and every operation stays differentiable.
Tests check it against the diffusers schedulers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepCoefficients:
    """Schedule quantities of one step, as 0-d float tensors."""

    alpha_bar: torch.Tensor
    alpha_bar_prev: torch.Tensor

    @property
    def beta(self) -> torch.Tensor:
        """The (respaced) β of this step: 1 - ᾱ_t / ᾱ_t'."""
        return 1.0 - self.alpha_bar / self.alpha_bar_prev

    @property
    def is_final(self) -> bool:
        """The step that lands on the clean image (no noise is added)."""
        return bool(self.alpha_bar_prev == 1.0)

    @property
    def posterior_variance(self) -> torch.Tensor:
        return self.beta * (1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar)


def step_coefficients(alphas_cumprod: torch.Tensor, t: int, t_prev: int) -> StepCoefficients:
    """ᾱ at t and t' (t' < 0 means the clean image, ᾱ = 1)."""
    one = torch.ones((), dtype=alphas_cumprod.dtype, device=alphas_cumprod.device)
    return StepCoefficients(alphas_cumprod[t], alphas_cumprod[t_prev] if t_prev >= 0 else one)


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor,
               clip: bool = True) -> torch.Tensor:
    """The clean-image estimate x̂0 = (x_t - sqrt(1-ᾱ) ε) / sqrt(ᾱ), optionally clipped to [-1, 1]."""
    x0 = (x_t - (1.0 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    return x0.clamp(-1.0, 1.0) if clip else x0


def learned_log_variance(variance_output: torch.Tensor, c: StepCoefficients) -> torch.Tensor:
    """ADM's learned-range variance: log σ² interpolates log β̃ (min) and log β (max)."""
    min_log = torch.log(c.posterior_variance.clamp(min=1e-20))
    max_log = torch.log(c.beta)
    fraction = (variance_output + 1.0) / 2.0
    return fraction * max_log + (1.0 - fraction) * min_log


def reverse_step(x_t: torch.Tensor, eps: torch.Tensor, c: StepCoefficients, noise: torch.Tensor,
                 eta: float = 1.0, variance_output: torch.Tensor | None = None,
                 clip: bool = True) -> torch.Tensor:
    """x_{t'} from x_t and the (possibly guided) noise prediction ε.

    With ``variance_output`` (a learned-range model) the DDPM posterior mean is used with the
    learned variance, so η must stay 1; otherwise the DDIM update with stochasticity η (η = 1 is
    ancestral DDPM with the posterior variance, η = 0 deterministic DDIM).
    """
    if variance_output is not None and eta != 1.0:
        raise ValueError(f"eta={eta}: a learned-variance model steps with its own variance, so "
                         "eta is not used; leave it at 1.0 (or use a fixed-variance model for DDIM)")
    x0 = predict_x0(x_t, eps, c.alpha_bar, clip)
    if variance_output is not None:
        mean = posterior_mean(x_t, x0, c)
        if c.is_final:
            return mean
        return mean + torch.exp(0.5 * learned_log_variance(variance_output, c)) * noise
    eps_for_direction = (x_t - c.alpha_bar.sqrt() * x0) / (1.0 - c.alpha_bar).sqrt() if clip else eps
    sigma = eta * c.posterior_variance.clamp(min=0.0).sqrt()
    direction = (1.0 - c.alpha_bar_prev - sigma**2).clamp(min=0.0).sqrt() * eps_for_direction
    return c.alpha_bar_prev.sqrt() * x0 + direction + sigma * noise


def posterior_mean(x_t: torch.Tensor, x0: torch.Tensor, c: StepCoefficients) -> torch.Tensor:
    """Mean of q(x_{t'} | x_t, x_0)."""
    coef_x0 = c.alpha_bar_prev.sqrt() * c.beta / (1.0 - c.alpha_bar)
    coef_xt = (1.0 - c.beta).sqrt() * (1.0 - c.alpha_bar_prev) / (1.0 - c.alpha_bar)
    return coef_x0 * x0 + coef_xt * x_t
