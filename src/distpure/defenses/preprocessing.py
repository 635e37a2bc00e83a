"""Input-preprocessing baseline defences: modules from [0, 1] images (N x 3 x H x W) to [0, 1] images.

Each slots into ``DefendedClassifier`` as the purifier. Those whose forward rounds (JPEG, bit depth)
have zero gradient almost everywhere; attack them with ``attacks.bpda.BPDA``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry

PREPROCESSING: Registry[nn.Module] = Registry("preprocessing defence")

# ITU-T T.81 Annex K base quantisation tables (luminance, chrominance), row-major 8 x 8.
_LUMA_TABLE = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
               14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
               18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
               49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
_CHROMA_TABLE = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
                 24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
                 *[99] * 32)
# JFIF full-range colour conversion.
_RGB_TO_YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
_YCBCR_TO_RGB = ((1.0, 0.0, 1.402), (1.0, -0.344136, -0.714136), (1.0, 1.772, 0.0))
_CHROMA_OFFSET = (0.0, 128.0, 128.0)


def _quantisation_table(base: tuple[int, ...], quality: int) -> torch.Tensor:
    """libjpeg's ``jpeg_quality_scaling`` of a base table, clamped to baseline [1, 255]."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return ((torch.tensor(base) * scale + 50) // 100).clamp(1, 255).float().view(8, 8)


def _dct_matrix() -> torch.Tensor:
    """The orthonormal 8-point DCT-II matrix (rows are frequencies), JPEG's normalisation."""
    frequency = torch.arange(8.0)[:, None]
    position = torch.arange(8.0)[None, :]
    basis = torch.cos((2 * position + 1) * frequency * math.pi / 16)
    return basis * torch.where(frequency == 0, math.sqrt(1 / 8), math.sqrt(2 / 8))


def _convert_colour(images: torch.Tensor, matrix: tuple[tuple[float, ...], ...]) -> torch.Tensor:
    return torch.einsum("ij,njhw->nihw", torch.tensor(matrix, device=images.device), images)


def _check_rgb(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images of shape N x 3 x H x W, got {tuple(images.shape)}")


@PREPROCESSING.register("jpeg")
class JPEG(nn.Module):
    """JPEG in torch (not PIL): 8-bit YCbCr 4:2:0, 8×8 DCT, IJG tables; rounding is the only
    non-differentiable step; ~40 dB PSNR to libjpeg's (PIL's) output, same distortion."""

    def __init__(self, quality: int = 75) -> None:
        super().__init__()
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
        self.quality = quality
        self.register_buffer("luma_table", _quantisation_table(_LUMA_TABLE, quality), persistent=False)
        self.register_buffer("chroma_table", _quantisation_table(_CHROMA_TABLE, quality),
                             persistent=False)
        self.register_buffer("dct", _dct_matrix(), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_rgb(images)
        height, width = images.shape[-2:]
        pixels = F.pad(torch.round(images * 255), (0, -width % 16, 0, -height % 16), mode="replicate")
        offset = torch.tensor(_CHROMA_OFFSET, device=images.device).view(1, 3, 1, 1)
        ycbcr = _convert_colour(pixels, _RGB_TO_YCBCR) + offset
        luma = self._compress(ycbcr[:, :1], self.luma_table)
        chroma = self._compress(F.avg_pool2d(ycbcr[:, 1:], 2), self.chroma_table)
        chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
        rgb = _convert_colour(torch.cat([luma, chroma], 1) - offset, _YCBCR_TO_RGB)
        return torch.round(rgb[..., :height, :width].clamp(0, 255)) / 255

    def _compress(self, planes: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Level shift, 8×8 block DCT, quantise with ``table``, dequantise and invert."""
        n, c, h, w = planes.shape
        blocks = (planes - 128).reshape(n, c, h // 8, 8, w // 8, 8).transpose(3, 4)
        coefficients = self.dct @ blocks @ self.dct.T
        blocks = self.dct.T @ (torch.round(coefficients / table) * table) @ self.dct
        return blocks.transpose(3, 4).reshape(n, c, h, w) + 128


@PREPROCESSING.register("bit-depth")
class BitDepthReduction(nn.Module):
    """Feature squeezing (Xu et al. 2018): rounds each channel to ``bits`` bits, 2**bits levels."""

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        if bits < 1:
            raise ValueError(f"bits must be at least 1, got {bits}")
        self.bits = bits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        levels = 2 ** self.bits - 1
        return torch.round(images * levels) / levels


@PREPROCESSING.register("median")
class MedianFilter(nn.Module):
    """Per-channel median over a ``kernel_size`` × ``kernel_size`` window, reflect-padded."""

    def __init__(self, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.kernel_size = kernel_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size
        padded = F.pad(images, (k // 2,) * 4, mode="reflect")
        windows = padded.unfold(2, k, 1).unfold(3, k, 1)
        return windows.flatten(-2).median(-1).values


@PREPROCESSING.register("resize-pad")
class RandomResizePad(nn.Module):
    """Xie et al. (2018), per image: resize to a random s' ∈ [s, ⌊scale·s⌋], zero-pad at a random
    offset to ⌊scale·s⌋, then resize back to s; ``seed`` makes the draws reproducible (they come
    from ``noise_generator``, whose state an interrupted attack saves to resume)."""

    stochastic = True

    def __init__(self, scale: float = 1.1, mode: str = "nearest", seed: int = 0) -> None:
        super().__init__()
        if scale < 1.0:
            raise ValueError(f"scale must be at least 1, got {scale}")
        self.scale = scale
        self.mode = mode
        self.seed = seed
        self.noise_generator = torch.Generator().manual_seed(seed)

    def variant(self, seed: int, **purifier_settings) -> "RandomResizePad":
        """The same transformation with a random stream of its own (for the attacker or one
        scoring draw); purifier settings such as ``checkpoint_steps`` do not apply here."""
        return RandomResizePad(self.scale, self.mode, seed)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._transform(image[None]) for image in images])

    def _transform(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        margin = int(min(height, width) * (self.scale - 1))
        extra = self._draw(margin)
        resized = F.interpolate(image, size=(height + extra, width + extra), mode=self.mode)
        top, left = self._draw(margin - extra), self._draw(margin - extra)
        padded = F.pad(resized, (left, margin - extra - left, top, margin - extra - top))
        return F.interpolate(padded, size=(height, width), mode="bilinear", align_corners=False)

    def _draw(self, high: int) -> int:
        """A uniform integer in [0, high]."""
        return int(torch.randint(high + 1, (), generator=self.noise_generator))


def _gradient(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences along width and height, zero at the last column / row."""
    return (F.pad(images.diff(dim=-1), (0, 1)), F.pad(images.diff(dim=-2), (0, 0, 0, 1)))


def _divergence(field_x: torch.Tensor, field_y: torch.Tensor) -> torch.Tensor:
    """Minus the adjoint of ``_gradient``."""
    return (field_x - F.pad(field_x[..., :-1], (1, 0))
            + field_y - F.pad(field_y[..., :-1, :], (0, 0, 1, 0)))


@PREPROCESSING.register("tv")
class TVDenoise(nn.Module):
    """Isotropic total-variation denoising per channel, argmin_u ½‖u − x‖² + weight·TV(u), by
    ``iterations`` steps of Chambolle's (2004) dual projection (as skimage), differentiable."""

    def __init__(self, weight: float = 0.1, iterations: int = 30) -> None:
        super().__init__()
        if weight <= 0 or iterations < 1:
            raise ValueError("weight must be positive and iterations at least 1")
        self.weight = weight
        self.iterations = iterations

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tau = 0.25
        dual_x, dual_y = torch.zeros_like(images), torch.zeros_like(images)
        for _ in range(self.iterations):
            grad_x, grad_y = _gradient(images + _divergence(dual_x, dual_y))
            shrink = 1 + tau / self.weight * (grad_x.square() + grad_y.square() + 1e-12).sqrt()
            dual_x, dual_y = (dual_x + tau * grad_x) / shrink, (dual_y + tau * grad_y) / shrink
        return (images + _divergence(dual_x, dual_y)).clamp(0.0, 1.0)


def build_preprocessing(name: str, **params) -> nn.Module:
    """The preprocessing defence ``name`` (jpeg, bit-depth, median, resize-pad, tv) with ``params``."""
    return PREPROCESSING.build(name, **params)
