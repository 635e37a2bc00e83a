"""Preprocessing baselines, BPDA and the AutoAttack wrapper, on tiny random models and images."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from distpure.attacks.autoattack import run_autoattack
from distpure.attacks.bpda import BPDA
from distpure.defenses.defended import DefendedClassifier
from distpure.defenses.preprocessing import build_preprocessing

NAMES = ["jpeg", "bit-depth", "median", "resize-pad", "tv"]


@pytest.fixture
def images() -> torch.Tensor:
    """Smooth random images (noise upsampled), 4 x 3 x 32 x 32 in [0, 1]."""
    generator = torch.Generator().manual_seed(0)
    return F.interpolate(torch.rand(4, 3, 8, 8, generator=generator), size=32, mode="bilinear")


def _victim() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a - b).square().mean()))


def _total_variation(images: torch.Tensor) -> float:
    return float(images.diff(dim=-1).abs().sum() + images.diff(dim=-2).abs().sum())


def _pil_jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Round trip through PIL's (libjpeg's) encoder and decoder."""
    outputs = []
    for image in images:
        buffer = io.BytesIO()
        pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        decoded = np.array(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        outputs.append(torch.from_numpy(decoded).permute(2, 0, 1).float() / 255)
    return torch.stack(outputs)


@pytest.mark.parametrize("name", NAMES)
def test_preprocessing_keeps_shape_and_range(name: str, images: torch.Tensor) -> None:
    output = build_preprocessing(name)(images)
    assert output.shape == images.shape
    assert output.min() >= 0 and output.max() <= 1
    assert not torch.equal(output, images)


def test_unknown_preprocessing_is_refused() -> None:
    with pytest.raises(KeyError, match="jpeg"):
        build_preprocessing("blur")


@pytest.mark.parametrize("size", [32, 30])
def test_jpeg_is_close_to_input_and_to_libjpeg(size: int, images: torch.Tensor) -> None:
    images = images[..., :size, :size]
    output = build_preprocessing("jpeg", quality=75)(images)
    reference = _pil_jpeg(images, quality=75)
    assert 20 < _psnr(output, images) < 45
    assert abs(_psnr(output, images) - _psnr(reference, images)) < 1.0
    assert _psnr(output, reference) > 33
    assert torch.equal(torch.round(output * 255) / 255, output)


def test_jpeg_quality_orders_distortion(images: torch.Tensor) -> None:
    psnrs = [_psnr(build_preprocessing("jpeg", quality=q)(images), images) for q in (10, 50, 95)]
    assert psnrs == sorted(psnrs)


@pytest.mark.parametrize("bits", [1, 3])
def test_bit_depth_has_at_most_two_to_the_bits_levels(bits: int, images: torch.Tensor) -> None:
    output = build_preprocessing("bit-depth", bits=bits)(images)
    assert output.unique().numel() <= 2 ** bits
    assert (output - images).abs().max() <= 0.5 / (2 ** bits - 1) + 1e-6


def test_median_removes_isolated_salt_pixel() -> None:
    images = torch.full((1, 3, 9, 9), 0.2)
    images[..., 4, 4] = 1.0
    output = build_preprocessing("median", kernel_size=3)(images)
    assert torch.allclose(output, torch.full_like(images, 0.2))


def test_resize_pad_is_random_but_seeded(images: torch.Tensor) -> None:
    first, second = build_preprocessing("resize-pad", seed=1), build_preprocessing("resize-pad", seed=1)
    draws = [first(images) for _ in range(3)]
    assert not torch.equal(draws[0], draws[1])
    assert all(torch.equal(draw, second(images)) for draw in draws)


def test_resize_pad_without_margin_is_identity(images: torch.Tensor) -> None:
    assert torch.allclose(build_preprocessing("resize-pad", scale=1.0)(images), images)


def test_tv_reduces_total_variation_and_stays_close(images: torch.Tensor) -> None:
    noisy = (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    output = build_preprocessing("tv", weight=0.1, iterations=30)(noisy)
    assert _total_variation(output) < 0.5 * _total_variation(noisy)
    assert _psnr(output, images) > _psnr(noisy, images)


def test_tv_is_differentiable(images: torch.Tensor) -> None:
    images = images.clone().requires_grad_(True)
    build_preprocessing("tv", iterations=5)(images).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["bit-depth", "median", "jpeg"])
def test_bpda_forward_is_the_defence_and_backward_the_identity(name: str, images: torch.Tensor) -> None:
    defence, victim = build_preprocessing(name), _victim()
    labels = torch.arange(4)
    x = images.clone().requires_grad_(True)
    output = BPDA(defence)(x)
    assert torch.equal(output, defence(images))
    F.cross_entropy(DefendedClassifier(victim, BPDA(defence))(x), labels).backward()
    purified = defence(images).requires_grad_(True)
    F.cross_entropy(victim(purified), labels).backward()
    assert torch.allclose(x.grad, purified.grad)


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def test_autoattack_apgd_ce_fools_a_linear_model_within_eps(images: torch.Tensor) -> None:
    victim, eps = _victim(), 4 / 255
    labels = victim(images).argmax(1).detach()
    adversarial = run_autoattack(victim, images, labels, eps=eps, attacks_to_run=["apgd-ce"]).examples
    assert adversarial.shape == images.shape
    assert (adversarial - images).abs().max() <= eps + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert _accuracy(victim, adversarial, labels) < _accuracy(victim, images, labels) == 1.0


def _expected_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       draws: int = 16) -> float:
    """Accuracy of a stochastic model averaged over ``draws`` independent calls."""
    return sum(_accuracy(model, images, labels) for _ in range(draws)) / draws


def test_autoattack_rand_with_eot_attacks_a_stochastic_defence(images: torch.Tensor) -> None:
    """The labels are the defence's own majority verdict on the clean images (the undefended
    victim's are often not what resize-pad lets it predict), so the drop in accuracy, averaged
    over draws, is the attack's doing."""
    eps = 4 / 255
    model = DefendedClassifier(_victim(), build_preprocessing("resize-pad", scale=1.04, seed=1))
    with torch.no_grad():
        labels = torch.stack([model(images).argmax(1) for _ in range(16)]).mode(0).values
    clean = _expected_accuracy(model, images, labels)
    adversarial = run_autoattack(model, images, labels, eps=eps, version="rand", eot_iter=2,
                                 attacks_to_run=["apgd-ce"]).examples
    attacked = _expected_accuracy(model, adversarial, labels)
    assert (adversarial - images).abs().max() <= eps + 1e-6
    assert clean >= 0.6 and attacked < clean - 0.3, (clean, attacked)
