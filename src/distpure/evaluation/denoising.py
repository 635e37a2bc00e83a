"""How well a diffusion model recovers clean images: PSNR of its x̂0 estimate at given t."""
from __future__ import annotations

import torch

from ..devices import autocast
from ..models.diffusion import DiffusionModel
from ..sampling.reverse import predict_x0
from ..sampling.schedule import forward_diffuse


@torch.no_grad()
def denoising_psnr(model: DiffusionModel, images: torch.Tensor, timesteps: list[int],
                   seed: int = 0, batch_size: int = 250, precision: str = "fp32") -> dict[int, float]:
    """Mean PSNR (dB, images in [0, 1]) of the one-step clean estimate from x_t, per timestep."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    results = {}
    for t in timesteps:
        alpha_bar = model.alphas_cumprod[t].to(device)
        psnrs = []
        for chunk in images.split(batch_size):
            x0 = chunk.to(device) * 2 - 1
            x_t = forward_diffuse(x0, alpha_bar, torch.randn(chunk.shape, generator=generator).to(device))
            with autocast(device, precision):
                eps = model.predict_noise(x_t, torch.full((len(chunk),), t, device=device))
            estimate = (predict_x0(x_t, eps.float(), alpha_bar) + 1) / 2
            mse = (estimate - chunk.to(device)).pow(2).flatten(1).mean(1).clamp_min(1e-10)
            psnrs.append(10 * torch.log10(1.0 / mse))
        results[t] = float(torch.cat(psnrs).mean())
    return results
