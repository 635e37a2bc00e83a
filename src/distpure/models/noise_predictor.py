"""What the purifier needs of any diffusion backbone: a noise predictor and the discrete
schedule it was trained on (``DiffusionModel`` in diffusion.py, ``ScoreSDEModel`` in ncsnpp.py)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..sampling.sde import VPSDE


class NoisePredictor(nn.Module):
    """A network predicting the noise ε in x_t, with the discrete schedule β_0 ... β_{N-1} it was
    trained on: what the purifier's samplers need of a diffusion backbone.

    ``forward(x_t, t)`` takes time labels on the step scale: integer steps 0 ... N-1 for the
    DDPM/DDIM samplers; for the SDE sampler, ``sde_time_label(t)`` of a continuous time t.
    """

    def __init__(self, betas: torch.Tensor) -> None:
        super().__init__()
        # float64: the float32 cumulative product drifts by ~1e-4 in log-variance at small t.
        # β stays a plain CPU attribute (``.to(dtype)`` does not round it); ᾱ follows the device.
        self.betas = betas.detach().double().cpu()
        alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    @property
    def sde(self) -> VPSDE:
        """The continuous VP-SDE this schedule discretises (for the sde sampler; linear β only)."""
        return VPSDE.from_betas(self.betas)

    def sde_time_label(self, t: float) -> int | float:
        """The label the network is called with at continuous time t ∈ (0, 1] of the SDE
        sampler. A network trained on discrete steps gets the step ⌊N·t⌋, as DiffPure calls
        guided-diffusion's UNet (``RevVPSDE._scale_timesteps``); the 1e-6 absorbs the float64
        drift of t* − k·dt below a whole step."""
        return math.floor(t * self.num_train_timesteps + 1e-6)

    @property
    def image_channels(self) -> int:
        raise NotImplementedError

    @property
    def sample_size(self) -> int:
        raise NotImplementedError

    @property
    def learned_variance(self) -> bool:
        """Whether outputs carry ADM's learned variance after the ε channels."""
        return False

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Raw network output for noisy images in [-1, 1] at time labels ``t`` (shape N)."""
        raise NotImplementedError

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The ε prediction (first ``image_channels`` output channels)."""
        return self(x_t, t)[:, : self.image_channels]

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write the model to ``directory`` in a layout ``load_diffusion`` reads back."""
        raise NotImplementedError
