"""Score-SDE's NCSN++ network, the CIFAR-10 backbone of DiffPure ("DDPM++ deep, VP, continuous").

Song et al.'s ``NCSNpp`` (score_sde_pytorch) in the configuration of its continuous VP models:
BigGAN-style residual blocks that resample by nearest-neighbour or 2x2 average pooling (``fir``
off), single-head self-attention at chosen resolutions, a sinusoidal embedding of the time label
999·t, residual sums scaled by 1/√2, no progressive growing. It predicts the noise ε in x_t;
with its VP-SDE (β from 0.1 to 20) it serves the discrete samplers and DiffPure's reverse SDE.

Weights come from a score_sde checkpoint (``checkpoint_8.pth``: its EMA weights, read with
``torch.load(weights_only=True)``), a safetensors state dict in score_sde's layout
(``all_modules.<i>``, renamed here), or a directory written by ``save_pretrained``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from ..sampling.sde import VPSDE
from .noise_predictor import NoisePredictor
from .weights import load_state_dict, save_state_dict, torch_load_weights_only

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
NAME = "ncsnpp"
#: score_sde settings this implementation builds only with one value: that value.
_FIXED_SETTINGS: dict[str, Any] = {
    "name": NAME, "scale_by_sigma": False, "normalization": "GroupNorm", "nonlinearity": "swish",
    "conditional": True, "fir": False, "skip_rescale": True, "resblock_type": "biggan",
    "progressive": "none", "progressive_input": "none", "attention_type": "ddpm",
    "embedding_type": "positional", "centered": True,
}
#: score_sde settings that do not change a trained model of this kind (initialisation, training,
#: branches the fixed settings turn off, the NCSN σ range).
_INERT_SETTINGS = frozenset({"ema_rate", "init_scale", "fourier_scale", "conv_size", "sigma_min",
                             "sigma_max", "resamp_with_conv", "fir_kernel", "progressive_combine"})
#: the NCSN σ table score_sde keeps as a buffer; VP models never read it
SIGMAS_KEY = "sigmas"
_RESBLOCK_PARTS = {"GroupNorm_0": "norm1", "Conv_0": "conv1", "Dense_0": "emb_proj",
                   "GroupNorm_1": "norm2", "Conv_1": "conv2", "Conv_2": "skip"}
_ATTENTION_PARTS = {"GroupNorm_0": "norm", "NIN_0": "q", "NIN_1": "k", "NIN_2": "v", "NIN_3": "out"}
# score_sde's NIN computes x @ W + b: W is a transposed linear weight.
_NIN_PARAMS = {"W": "weight", "b": "bias"}
_SHOWN_KEYS = 8


@dataclass(frozen=True)
class NCSNppConfig:
    """What shapes the network and its schedule (score_sde's names); the defaults are
    ``configs/vp/cifar10_ddpmpp_deep_continuous.py``, the model of DiffPure's ``checkpoint_8.pth``."""

    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 8
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    image_size: int = 32
    num_channels: int = 3
    beta_min: float = 0.1
    beta_max: float = 20.0
    num_scales: int = 1000

    def to_json(self) -> dict[str, Any]:
        """The settings as written to ``config.json`` (``name`` marks an NCSN++ model)."""
        return {"name": NAME, **dataclasses.asdict(self)}


def ncsnpp_config(settings: Mapping[str, Any]) -> NCSNppConfig:
    """An ``NCSNppConfig`` from score_sde's model settings (as in its config files, optionally with
    ``image_size`` and ``num_channels``); refuses unknown settings and other architectures."""
    fields = {field.name for field in dataclasses.fields(NCSNppConfig)}
    unknown = sorted(set(settings) - fields - set(_FIXED_SETTINGS) - _INERT_SETTINGS)
    if unknown:
        raise ValueError(f"unknown NCSN++ settings: {', '.join(unknown)}")
    for name, supported in _FIXED_SETTINGS.items():
        if settings.get(name, supported) != supported:
            raise ValueError(f"cannot build an NCSN++ with {name}={settings[name]!r}: only {name}="
                             f"{supported!r} is supported (the DDPM++ continuous VP models)")
    values = {key: tuple(value) if isinstance(value, list) else value
              for key, value in settings.items() if key in fields}
    return NCSNppConfig(**values)


def _group_norm(channels: int) -> nn.GroupNorm:
    """score_sde's normalisation: min(C / 4, 32) groups, ε = 1e-6."""
    return nn.GroupNorm(min(channels // 4, 32), channels, eps=1e-6)


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


def _residual_sum(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(x + h) / √2, which keeps the variance of a sum of two unit-variance paths at one."""
    return (x + h) / math.sqrt(2.0)


_RESAMPLERS = {"none": nn.Identity, "up": partial(nn.Upsample, scale_factor=2, mode="nearest"),
               "down": partial(nn.AvgPool2d, 2)}


class ResBlock(nn.Module):
    """BigGAN++ residual block: norm, SiLU, (resample), conv, + time embedding, norm, SiLU,
    dropout, conv; the skip path is resampled and 1x1-projected when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float,
                 resample: str = "none") -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.resample = _RESAMPLERS[resample]()
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3x3(out_channels, out_channels)
        reshaped = in_channels != out_channels or resample != "none"
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if reshaped else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.resample(F.silu(self.norm1(x))))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return _residual_sum(self.skip(self.resample(x)), h)


class SelfAttention(nn.Module):
    """Single-head self-attention over all positions, added back to the input (DDPM's block).

    Written out rather than with ``scaled_dot_product_attention``, whose CPU kernel has no
    double backward (attacks differentiate through guidance gradients)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q, self.k, self.v, self.out = (nn.Linear(channels, channels) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = self.q(tokens), self.k(tokens), self.v(tokens)
        weights = torch.softmax(q @ k.transpose(1, 2) * channels**-0.5, dim=-1)
        h = self.out(weights @ v).transpose(1, 2).reshape(batch, channels, height, width)
        return _residual_sum(x, h)


class Level(nn.Module):
    """One resolution of the U-Net: residual blocks, each followed by its attention (or an
    identity), then an optional resampling residual block."""

    def __init__(self, blocks: list[ResBlock], attentions: list[nn.Module],
                 resample: ResBlock | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attentions = nn.ModuleList(attentions)
        self.resample = resample

    def units(self) -> Iterator[tuple[ResBlock, nn.Module]]:
        """(block, attention) pairs in order."""
        return zip(self.blocks, self.attentions)


def _attention(channels: int, wanted: bool) -> nn.Module:
    return SelfAttention(channels) if wanted else nn.Identity()


def _down_levels(config: NCSNppConfig, block: Callable[..., ResBlock], attends: list[bool]
                 ) -> tuple[nn.ModuleList, list[int]]:
    """The encoder levels, and the widths of the skip activations they leave for the decoder
    (the input convolution's first)."""
    width, skip_widths, levels = config.nf, [config.nf], []
    for level, attend in enumerate(attends):
        out = config.nf * config.ch_mult[level]
        blocks = [block(width if j == 0 else out, out) for j in range(config.num_res_blocks)]
        resample = block(out, out, resample="down") if level < len(attends) - 1 else None
        skip_widths += [out] * (len(blocks) + (resample is not None))
        levels.append(Level(blocks, [_attention(out, attend) for _ in blocks], resample))
        width = out
    return nn.ModuleList(levels), skip_widths


def _up_levels(config: NCSNppConfig, block: Callable[..., ResBlock], attends: list[bool],
               skip_widths: list[int]) -> nn.ModuleList:
    """The decoder levels: each block takes its input concatenated with the latest unused skip,
    attention (if any) follows the level's last block."""
    width, levels = skip_widths[-1], []
    for level in reversed(range(len(attends))):
        out = config.nf * config.ch_mult[level]
        blocks = []
        for _ in range(config.num_res_blocks + 1):
            blocks.append(block(width + skip_widths.pop(), out))
            width = out
        attentions = [nn.Identity() for _ in blocks[1:]] + [_attention(out, attends[level])]
        levels.append(Level(blocks, attentions, block(out, out, resample="up") if level else None))
    return nn.ModuleList(levels)


class NCSNpp(nn.Module):
    """The noise-prediction U-Net: images in [-1, 1] and time labels (999·t) to ε."""

    def __init__(self, config: NCSNppConfig) -> None:
        super().__init__()
        nf, levels = config.nf, len(config.ch_mult)
        emb_dim = 4 * nf
        block = partial(ResBlock, emb_dim=emb_dim, dropout=config.dropout)
        attends = [config.image_size // 2**level in config.attn_resolutions for level in range(levels)]
        self.nf = nf
        self.time_embed = nn.Sequential(nn.Linear(nf, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = _conv3x3(config.num_channels, nf)
        self.down, skip_widths = _down_levels(config, block, attends)
        width = skip_widths[-1]
        self.middle = Level([block(width, width), block(width, width)],
                            [SelfAttention(width), nn.Identity()])
        self.up = _up_levels(config, block, attends, skip_widths)
        self.norm_out = _group_norm(nf * config.ch_mult[0])
        self.conv_out = _conv3x3(nf * config.ch_mult[0], config.num_channels)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(get_timestep_embedding(labels, self.nf, downscale_freq_shift=1))
        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for block, attention in level.units():
                h = attention(block(h, emb))
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h, emb)
                skips.append(h)
        for block, attention in self.middle.units():
            h = attention(block(h, emb))
        for level in self.up:
            for block, attention in level.units():
                h = attention(block(torch.cat([h, skips.pop()], dim=1), emb))
            if level.resample is not None:
                h = level.resample(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))

    def score_sde_order(self) -> list[str]:
        """Names of the submodules in the order of score_sde's ``all_modules`` list, whose index
        names them in its checkpoints."""
        names = ["time_embed.0", "time_embed.2", "conv_in"]
        levels = [*((f"down.{i}", level) for i, level in enumerate(self.down)), ("middle", self.middle),
                  *((f"up.{i}", level) for i, level in enumerate(self.up))]
        for prefix, level in levels:
            for j, attention in enumerate(level.attentions):
                names.append(f"{prefix}.blocks.{j}")
                if isinstance(attention, SelfAttention):
                    names.append(f"{prefix}.attentions.{j}")
            if level.resample is not None:
                names.append(f"{prefix}.resample")
        return names + ["norm_out", "conv_out"]


def _convert_key(key: str, tensor: torch.Tensor, order: list[str], modules: dict[str, nn.Module]
                 ) -> tuple[str, torch.Tensor] | None:
    """This network's (name, tensor) for one score_sde entry ``all_modules.<i>.<...>`` (None if
    it has no counterpart)."""
    match = re.fullmatch(r"all_modules\.(\d+)\.(.+)", key)
    if match is None or int(match[1]) >= len(order):
        return None
    name, rest = order[int(match[1])], match[2]
    part, _, param = rest.partition(".")
    module = modules[name]
    if isinstance(module, ResBlock) and part in _RESBLOCK_PARTS:
        return f"{name}.{_RESBLOCK_PARTS[part]}.{param}", tensor
    if isinstance(module, SelfAttention) and part in _ATTENTION_PARTS:
        value = tensor.t().contiguous() if param == "W" else tensor
        return f"{name}.{_ATTENTION_PARTS[part]}.{_NIN_PARAMS.get(param, param)}", value
    if isinstance(module, (ResBlock, SelfAttention)):
        return None
    return f"{name}.{rest}", tensor


def convert_score_sde_state_dict(state: Mapping[str, torch.Tensor], network: NCSNpp
                                 ) -> dict[str, torch.Tensor]:
    """Rename score_sde's ``all_modules.<i>`` entries (NIN weights transposed) into ``network``'s
    keys; the unused ``sigmas`` buffer is dropped, anything else without a counterpart refused."""
    order, modules = network.score_sde_order(), dict(network.named_modules())
    converted, unmapped = {}, []
    for key, tensor in state.items():
        entry = None if key == SIGMAS_KEY else _convert_key(key, tensor, order, modules)
        if entry is not None:
            converted[entry[0]] = entry[1]
        elif key != SIGMAS_KEY:
            unmapped.append(key)
    if unmapped:
        shown = ", ".join(unmapped[:_SHOWN_KEYS]) + (", ..." if len(unmapped) > _SHOWN_KEYS else "")
        raise ValueError(f"{len(unmapped)} score_sde keys with no NCSN++ counterpart: {shown}")
    return converted


def ema_state_dict(checkpoint: Mapping[str, Any], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The EMA weights of a score_sde training checkpoint as a state dict, as DiffPure loads them:
    ``ema.shadow_params`` (``model.parameters()`` order) over the parameter keys of ``model``
    (the raw weights, ``module.``-prefixed by DataParallel)."""
    raw, ema = checkpoint.get("model"), checkpoint.get("ema")
    shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
    if not isinstance(raw, Mapping) or not isinstance(shadow, list):
        raise ValueError(f"{source}: not a score_sde checkpoint (expected 'model' weights and "
                         "'ema' with 'shadow_params'); a plain state dict must be a .safetensors file")
    keys = [key.removeprefix("module.") for key in raw]
    keys = [key for key in keys if key != SIGMAS_KEY]
    if len(keys) != len(shadow):
        raise ValueError(f"{source}: {len(shadow)} EMA tensors for {len(keys)} model parameters")
    for key, tensor in zip(keys, shadow):
        expected = raw.get(f"module.{key}", raw.get(key))
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ValueError(f"{source}: EMA tensor for {key} has shape {tuple(tensor.shape)}, "
                             f"the parameter {tuple(expected.shape)}")
    return dict(zip(keys, shadow))


class ScoreSDEModel(NoisePredictor):
    """NCSN++ with its VP schedule: continuous (β(t) = β_min + t (β_max - β_min)) for the reverse
    SDE, discretised to N steps β_i = β(i / (N-1)) / N for the DDPM/DDIM samplers (score-SDE's
    and DiffPure's discretisation); integer step i is the time label i = 999·t."""

    def __init__(self, network: NCSNpp, config: NCSNppConfig) -> None:
        n = config.num_scales
        betas = torch.linspace(config.beta_min / n, config.beta_max / n, n, dtype=torch.float64)
        super().__init__(betas)
        self.network = network
        self.config = config

    @property
    def sde(self) -> VPSDE:
        return VPSDE(self.config.beta_min, self.config.beta_max)

    @property
    def image_channels(self) -> int:
        return self.config.num_channels

    @property
    def sample_size(self) -> int:
        return self.config.image_size

    def sde_time_label(self, t: float) -> float:
        """score_sde's continuous VP models take (N-1)·t (``models/utils.py``, as DiffPure runs them)."""
        return t * (self.num_train_timesteps - 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.network(x_t, t)

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write ``config.json`` and the weights as ``model.safetensors`` (this module's keys)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config.to_json(), indent=1) + "\n")
        save_state_dict(self.network, directory / WEIGHTS_FILE, dtype)


def build_score_sde(state: Mapping[str, torch.Tensor], config: NCSNppConfig,
                    source: str = "weights") -> ScoreSDEModel:
    """A float32 ``ScoreSDEModel`` from a state dict in score_sde's layout or this module's."""
    with torch.device("meta"):
        network = NCSNpp(config)
    try:
        if any(key.startswith("all_modules.") for key in state):
            state = convert_score_sde_state_dict(state, network)
        network.load_state_dict({key: value.float() for key, value in state.items()}, assign=True)
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"{source}: the weights do not fit the NCSN++ config {config} (pass the "
                         f"model's settings as <stem>_config.json beside it, or as config): "
                         f"{str(error)[:1000]}") from error
    return ScoreSDEModel(network.eval(), config).eval()


def score_sde_config_file(path: str | Path) -> Path | None:
    """The NCSN++ config JSON (``"name": "ncsnpp"``) of a converted directory, or beside a weights
    file (``<stem>_config.json`` or ``config.json``); None if there is none."""
    path = Path(path)
    candidates = ([path / CONFIG_FILE] if path.is_dir() else
                  [path.with_name(f"{path.stem}_config.json"), path.with_name(CONFIG_FILE)])
    for candidate in candidates:
        if candidate.is_file():
            settings = json.loads(candidate.read_text())
            if isinstance(settings, dict) and settings.get("name") == NAME:
                return candidate
    return None


def is_score_sde(path: str | Path) -> bool:
    """Whether ``path`` is a score_sde checkpoint (``.pth``, as ``checkpoint_8.pth``) or a file or
    directory that an NCSN++ config describes."""
    path = Path(path)
    return (path.is_file() and path.suffix == ".pth") or score_sde_config_file(path) is not None


def _resolve_config(path: Path, config: NCSNppConfig | Mapping[str, Any] | str | Path | None
                    ) -> NCSNppConfig:
    """``config`` as an ``NCSNppConfig``: given, read from a JSON path, found beside ``path``, or
    (for a bare checkpoint) DiffPure's DDPM++ deep continuous model."""
    if isinstance(config, NCSNppConfig):
        return config
    if config is None:
        config = score_sde_config_file(path)
        if config is None:
            if path.is_dir():
                raise FileNotFoundError(f"{path}: no {CONFIG_FILE} with \"name\": \"{NAME}\"")
            return NCSNppConfig()
    if isinstance(config, (str, Path)):
        config = json.loads(Path(config).read_text())
    return ncsnpp_config(config)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict: a directory's ``model.safetensors``, a safetensors file, or the EMA weights
    of a score_sde ``.pth``/``.pt`` checkpoint."""
    if path.is_dir():
        return load_state_dict(path / WEIGHTS_FILE)
    if path.suffix == ".safetensors":
        return load_state_dict(path)
    checkpoint = torch_load_weights_only(path)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: not a score_sde checkpoint (a {type(checkpoint).__name__})")
    return ema_state_dict(checkpoint, str(path))


def load_score_sde(path: str | Path, config: NCSNppConfig | Mapping[str, Any] | str | Path | None = None
                   ) -> ScoreSDEModel:
    """An NCSN++ from a score_sde checkpoint (its EMA weights), a safetensors state dict or a
    converted directory. ``config`` (settings, or a JSON file of them) defaults to the NCSN++
    config of the directory or beside the file, else DiffPure's DDPM++ deep continuous model."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such score-SDE checkpoint or directory")
    return build_score_sde(_read_weights(path), _resolve_config(path, config), str(path))


def convert_score_sde(checkpoint: str | Path, out_dir: str | Path,
                      config: NCSNppConfig | Mapping[str, Any] | str | Path | None = None) -> Path:
    """Write a score_sde checkpoint's EMA model as a directory ``load_diffusion`` reads
    (``config.json`` + ``model.safetensors``)."""
    load_score_sde(checkpoint, config).save_pretrained(out_dir)
    return Path(out_dir)
