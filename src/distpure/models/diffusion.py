"""diffusers UNets as noise predictors: ``DiffusionModel`` (a ``UNet2DModel`` with its
scheduler, converted to ε), the standard schedule and the compact UNet of the embedded default."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

from .noise_predictor import NoisePredictor

# What a diffusers scheduler's ``prediction_type`` may say the UNet predicts.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class DiffusionModel(NoisePredictor):
    """A diffusers UNet and the discrete forward schedule it was trained with.

    UNets predicting v or x0 (the scheduler's ``prediction_type``) are converted to ε. Outputs
    with twice the input channels carry ADM's learned variance in the second half.
    """

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler) -> None:
        super().__init__(scheduler.betas)
        self.unet = unet
        self.scheduler = scheduler
        self.prediction_type = str(scheduler.config.prediction_type)
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not supported; "
                             f"expected one of {', '.join(PREDICTION_TYPES)}")

    @property
    def image_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def sample_size(self) -> int:
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def learned_variance(self) -> bool:
        return int(self.unet.config.out_channels) == 2 * self.image_channels

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε (then any learned variance) for noisy images in [-1, 1] at timesteps ``t`` (shape N)."""
        output = self.unet(x_t, t).sample
        if self.prediction_type == "epsilon":
            return output
        channels = self.image_channels
        alpha_bar = self._alpha_bar(t).to(x_t.dtype)
        eps = epsilon_from_prediction(output[:, :channels], x_t, alpha_bar, self.prediction_type)
        return torch.cat([eps, output[:, channels:]], dim=1)

    def _alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ at integer timesteps ``t``, shaped to broadcast over images."""
        steps = t.long()
        if not torch.equal(steps.to(t.dtype), t):
            raise ValueError(f"a {self.prediction_type} model is converted to ε at integer "
                             f"timesteps only (DDPM/DDIM samplers); got {t.tolist()}")
        return self.alphas_cumprod[steps].view(-1, 1, 1, 1)

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write a diffusers layout: ``config.json``, safetensors weights, ``scheduler_config.json``."""
        directory = Path(directory)
        unet = self.unet if dtype is None else _copy_as(self.unet, dtype)
        unet.save_pretrained(directory, safe_serialization=True)
        self.scheduler.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "DiffusionModel":
        """Load a diffusers directory (weights in safetensors, upcast to float32)."""
        directory = Path(directory)
        unet_dir = directory / "unet" if (directory / "unet" / "config.json").is_file() else directory
        scheduler_dir = (directory / "scheduler"
                         if (directory / "scheduler" / "scheduler_config.json").is_file() else directory)
        _refuse_links_out_of(directory, (unet_dir, scheduler_dir))
        unet = UNet2DModel.from_pretrained(unet_dir, torch_dtype=torch.float32, use_safetensors=True,
                                           low_cpu_mem_usage=False)
        scheduler = DDPMScheduler.from_pretrained(scheduler_dir)
        return cls(unet.float(), scheduler).eval()


def epsilon_from_prediction(prediction: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor,
                            prediction_type: str) -> torch.Tensor:
    """ε from a prediction of v = √ᾱ ε - √(1-ᾱ) x0 (``v_prediction``) or of x0 (``sample``),
    given x_t = √ᾱ x0 + √(1-ᾱ) ε; an ``epsilon`` prediction is returned as it is."""
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * prediction + (1.0 - alpha_bar).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - alpha_bar.sqrt() * prediction) / (1.0 - alpha_bar).sqrt()
    return prediction


def _refuse_links_out_of(directory: Path, folders: tuple[Path, ...]) -> None:
    """Refuse config or weights files of ``folders`` that resolve outside ``directory`` (a hub
    cache snapshot, ``<repo>/snapshots/<revision>``, may link into its own ``<repo>``)."""
    root = directory.resolve()
    if root.parent.name == "snapshots":
        root = root.parent.parent
    for folder in folders:
        for file in folder.iterdir():
            if file.suffix in (".json", ".safetensors") and not file.resolve().is_relative_to(root):
                raise ValueError(f"{file}: links to {file.resolve()}, outside the model directory "
                                 f"{directory}; refusing to load it")


def _copy_as(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` in ``dtype`` (through ``nn.Module.to``: diffusers' override warns
    about modules to keep in float32, which these UNets do not have)."""
    import copy

    return nn.Module.to(copy.deepcopy(module), dtype)


def default_scheduler() -> DDPMScheduler:
    """The linear 1000-step schedule of Ho et al. (identical to google/ddpm-cifar10-32)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                         beta_schedule="linear", clip_sample=True, variance_type="fixed_large")


def small_unet(sample_size: int = 32, channels: tuple[int, ...] = (64, 128, 256),
               layers_per_block: int = 1, attention: bool = False) -> UNet2DModel:
    """A compact convolutional UNet for 32 x 32 images (the embedded default's architecture)."""
    levels = len(channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3,
                       block_out_channels=tuple(channels), layers_per_block=layers_per_block,
                       down_block_types=tuple(down), up_block_types=tuple(up),
                       add_attention=attention, norm_num_groups=math.gcd(32, *channels))
