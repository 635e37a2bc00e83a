"""Where purification starts (t*) and which timesteps the reverse process visits."""
from __future__ import annotations

import torch


def resolve_t_star(t_star: int | float, num_train_timesteps: int) -> int:
    """t* as an integer step of the training schedule; a float in (0, 1) is a fraction of it."""
    if isinstance(t_star, bool) or not isinstance(t_star, (int, float)):
        raise TypeError(f"t_star must be an int step or a float fraction, got {t_star!r}")
    if isinstance(t_star, float):
        if 0.0 < t_star < 1.0:
            t_star = round(t_star * num_train_timesteps)
        elif t_star.is_integer():
            t_star = int(t_star)
        else:
            raise ValueError(f"t_star {t_star} is neither a fraction in (0, 1) nor a whole step")
    if not 1 <= t_star < num_train_timesteps:
        raise ValueError(f"t_star must be in [1, {num_train_timesteps - 1}] "
                         f"(or a fraction in (0, 1)), got {t_star}")
    return t_star


def reverse_timesteps(t_star: int, num_steps: int | None = None) -> list[int]:
    """Descending timesteps from t* visited by the reverse process; the step after the last is 0.

    ``num_steps=None`` visits every step t*, t*-1, ..., 1 (DDPM ancestral, as in DiffPure);
    fewer steps are spaced evenly (strided/DDIM sampling).
    """
    num_steps = t_star if num_steps is None else int(num_steps)
    if not 1 <= num_steps <= t_star:
        raise ValueError(f"num_steps must be in [1, t_star={t_star}], got {num_steps}")
    grid = torch.linspace(t_star, 0, num_steps + 1).round().long().tolist()
    return grid[:-1]


def forward_diffuse(x0: torch.Tensor, alpha_bar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I) with the given standard noise."""
    return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise
