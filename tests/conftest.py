"""Shared fixtures: a tiny random diffusion model and victim, random images, and ../shared data.

Everything here is small enough for a loaded 2-core CPU. Shared data (``../shared`` beside the
checkout) is optional: tests that need it skip with a reason when it is absent, or fail when
``DISTPURE_REQUIRE_DATA=1`` (CI, where a missing directory is a setup error, not a skip).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

from distpure.models.diffusion import DiffusionModel, default_scheduler, small_unet

TINY_SIZE = 16
NUM_CLASSES = 10

# The tests' models are tiny: one thread is fastest, and with other CPU-bound work on the machine
# (a training job) more threads mostly spin. DISTPURE_TEST_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("DISTPURE_TEST_THREADS", "1")))


def shared_dir() -> Path:
    """``../shared`` beside the checkout (the repository root is ``tests/..``)."""
    return Path(__file__).resolve().parents[2] / "shared"


def require_shared_path(subpath: str) -> Path:
    """``shared_dir() / subpath``; skip if it is absent, or fail with DISTPURE_REQUIRE_DATA=1."""
    path = shared_dir() / subpath
    if not path.exists():
        message = f"shared data {path} is not available"
        if os.environ.get("DISTPURE_REQUIRE_DATA") == "1":
            pytest.fail(f"{message} and DISTPURE_REQUIRE_DATA=1 requires it")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def require_shared() -> Callable[[str], Path]:
    """The ``require_shared_path`` helper, as a fixture: ``require_shared("data/cifar10-jpeg")``."""
    return require_shared_path


def make_tiny_diffusion(seed: int = 0) -> DiffusionModel:
    """A random 16 x 16 DDPM (two levels, one layer per block) on the standard linear schedule.

    ``small_unet`` uses diffusers' default 32 GroupNorm groups, so every level needs a multiple of
    32 channels: (16, 32) as in the brief cannot be built, (32, 32) is the smallest that can.
    """
    torch.manual_seed(seed)
    unet = small_unet(sample_size=TINY_SIZE, channels=(32, 32), layers_per_block=1)
    return DiffusionModel(unet, default_scheduler()).eval()


def make_tiny_victim(seed: int = 0) -> nn.Module:
    """A random smooth (SiLU) conv net from [0, 1] images to 10 logits, frozen, in eval mode."""
    torch.manual_seed(seed)
    victim = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.SiLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * 4, NUM_CLASSES))
    return victim.eval().requires_grad_(False)


def make_tiny_images(n: int = 2, seed: int = 0, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """n random 3 x 16 x 16 images with values in [low, high]."""
    generator = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, 3, TINY_SIZE, TINY_SIZE, generator=generator)


@pytest.fixture
def tiny_diffusion() -> DiffusionModel:
    return make_tiny_diffusion()


@pytest.fixture
def tiny_victim() -> nn.Module:
    return make_tiny_victim()


@pytest.fixture
def tiny_images() -> torch.Tensor:
    return make_tiny_images()
