"""Diffusion backbones: noise predictors with the schedule they were trained on.

``NoisePredictor`` is what the purifier needs of any backbone; ``DiffusionModel`` is a diffusers
``UNet2DModel`` with its scheduler, ``ScoreSDEModel`` (models/ncsnpp.py) score-SDE's NCSN++.
``load_diffusion`` takes a registry name (the embedded default is ``cifar10-ddpm-small``), a
local diffusers directory (layout of ``google/ddpm-cifar10-32``), a guided-diffusion (ADM)
checkpoint file (``.pt`` or ``.safetensors``), a score-SDE checkpoint (``checkpoint_8.pth``,
or a file or directory with an NCSN++ config), or a hub id for online users.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

from ..registry import Registry, build_from_spec, is_callable_spec
from ..sampling.sde import VPSDE

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
# Single-file guided-diffusion (ADM) checkpoints; flags come from a config JSON beside the file.
ADM_SUFFIXES = (".pt", ".safetensors")
# What a diffusers scheduler's ``prediction_type`` may say the UNet predicts.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DIFFUSION_MODELS: Registry["NoisePredictor"] = Registry("diffusion model")


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


@DIFFUSION_MODELS.register("cifar10-ddpm-small")
def cifar10_ddpm_small() -> DiffusionModel:
    """The embedded default: a 10 M-parameter DDPM trained by ``distpure train-diffusion``."""
    directory = WEIGHTS_DIR / "cifar10-ddpm-small"
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"the embedded diffusion model is missing from {directory}; "
                                "reinstall distpure or train one with `distpure train-diffusion`")
    return DiffusionModel.from_pretrained(directory)


def load_diffusion(name_or_path: str | Path) -> NoisePredictor:
    """A diffusion model by registry name, local directory / checkpoint file, hub id, or
    ``package.module:callable`` (your function returning a ``NoisePredictor``)."""
    from .ncsnpp import is_score_sde, load_score_sde

    name = str(name_or_path)
    if name in DIFFUSION_MODELS:
        return DIFFUSION_MODELS.build(name)
    if is_callable_spec(name):
        return build_from_spec(name, NoisePredictor, "diffusion model")
    path = Path(name).expanduser()
    if is_score_sde(path):
        return load_score_sde(path)
    if path.is_dir():
        return DiffusionModel.from_pretrained(path)
    if path.is_file() and path.suffix in ADM_SUFFIXES:
        from .adm import load_adm_checkpoint

        return load_adm_checkpoint(path)
    if path.exists():
        raise ValueError(f"{path}: expected a diffusers directory or a guided-diffusion "
                         ".pt / .safetensors file, or a score-SDE .pth checkpoint")
    return _from_hub(name)


def _from_hub(repo_id: str) -> DiffusionModel:
    """Download a diffusers repository (e.g. ``google/ddpm-cifar10-32``) and load it."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"{repo_id!r} is neither a registered model ({', '.join(DIFFUSION_MODELS.names())}), "
            "an existing local path, a package.module:callable, nor a hub id of the form 'owner/name'")
    from huggingface_hub import snapshot_download

    try:
        directory = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"])
    except Exception as error:  # network and hub errors come in many types
        raise FileNotFoundError(
            f"could not download {repo_id!r} from the model hub ({type(error).__name__}). "
            f"If you are offline, download it elsewhere and pass the local directory instead, "
            f"e.g. load_diffusion('/path/to/{repo_id.split('/')[-1]}')") from error
    return DiffusionModel.from_pretrained(directory)
