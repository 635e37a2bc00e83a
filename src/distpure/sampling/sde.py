"""DiffPure's sampler: the reverse-time VP-SDE solved by Euler-Maruyama with a fixed step dt.

The VP-SDE dx = -½ β(t) x dt + √β(t) dw, β(t) = β_min + t (β_max - β_min) on t ∈ [0, 1], runs
backwards as dx = [-½ β x - β ∇log p_t(x)] dt + √β dw̄ (Song et al., score-SDE). DiffPure solves
it from t* down to 1e-5 with torchsde's Euler method; a step here is the same update with the
Brownian increment dW passed in, so that noise can be frozen and steps recomputed in backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: where DiffPure stops the reverse SDE (short of t = 0, where the score is singular)
T_END = 1e-5


@dataclass(frozen=True)
class VPSDE:
    """The variance-preserving SDE with a linear β(t); the defaults are DDPM's (and score-SDE's)."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "VPSDE":
        """The VP-SDE that the linear discrete schedule β_0 ... β_{N-1} = β(i / (N-1)) / N samples."""
        n = len(betas)
        betas = betas.detach().double().cpu()
        linear = torch.linspace(float(betas[0]), float(betas[-1]), n, dtype=torch.float64)
        if not torch.allclose(betas, linear, rtol=1e-5, atol=0.0):
            raise ValueError("the sde sampler needs a model trained on a linear β schedule (the "
                             "discretised VP-SDE); this model's schedule is not linear")
        return cls(float(betas[0]) * n, float(betas[-1]) * n)

    def beta(self, t: float) -> float:
        """β(t), the noise rate at time t."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def alpha_bar(self, t: float) -> float:
        """ᾱ(t) = exp(-∫₀ᵗ β): the marginal is x_t ~ N(√ᾱ(t) x_0, (1 - ᾱ(t)) I)."""
        return math.exp(-self.beta_min * t - 0.5 * (self.beta_max - self.beta_min) * t * t)

    def std(self, t: float) -> float:
        """The marginal standard deviation √(1 - ᾱ(t)), which turns ε into the score -ε / std."""
        return math.sqrt(1.0 - self.alpha_bar(t))


def reverse_drift(x: torch.Tensor, score: torch.Tensor, sde: VPSDE, t: float) -> torch.Tensor:
    """The reverse SDE's drift in forward time: f(x, t) - g(t)² score = -½ β x - β score."""
    beta = sde.beta(t)
    return -0.5 * beta * x - beta * score


def reverse_sde_step(x: torch.Tensor, score: torch.Tensor, sde: VPSDE, t: float, dt: float,
                     dw: torch.Tensor) -> torch.Tensor:
    """One Euler-Maruyama step from t to t - dt: x - drift dt + √β(t) dW, dW ~ N(0, dt I)."""
    return x - reverse_drift(x, score, sde, t) * dt + math.sqrt(sde.beta(t)) * dw


def reverse_sde_times(t_star: float, dt: float, t_end: float = T_END) -> list[float]:
    """Start times t*, t* - dt, ... of the steps to ``t_end``; the last step is shortened to land
    on ``t_end`` (as torchsde does), so t* = 0.1, dt = 1e-3 gives DiffPure's 100 steps."""
    if not 0.0 < dt <= 1.0:
        raise ValueError(f"dt must be in (0, 1] (a step of the SDE's time [0, 1]), got {dt}")
    if not t_end < t_star <= 1.0:
        raise ValueError(f"the reverse SDE starts at t* in ({t_end}, 1], got {t_star}")
    steps = math.ceil((t_star - t_end) / dt - 1e-9)
    return [t_star - k * dt for k in range(steps)]
