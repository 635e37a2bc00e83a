"""Input checks shared by defences and attacks: a clear error before any long work starts."""
from __future__ import annotations

import math
from collections.abc import Collection

import torch


def check_choice(setting: str, value: object, choices: Collection[str]) -> None:
    """Refuse a ``value`` of ``setting`` that is not one of ``choices``, naming it and them all."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {setting} {value!r}; expected one of {', '.join(choices)}")


def check_unit_images(images: torch.Tensor) -> None:
    """Refuse anything but a non-empty float tensor of finite values in [0, 1], naming the problem."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a tensor of images, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"expected float images in [0, 1], got dtype {images.dtype}")
    if images.numel() == 0:
        raise ValueError(f"expected at least one image, got an empty tensor of shape {tuple(images.shape)}")
    with torch.no_grad():
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or Inf values")
        low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"images must lie in [0, 1]; got values in [{low:.3g}, {high:.3g}]")


def check_labels(labels: torch.Tensor, num_images: int, num_classes: int) -> None:
    """Refuse labels that are not one integer class index in [0, num_classes) per image."""
    kind = getattr(labels, "dtype", type(labels).__name__)
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        raise TypeError(f"expected integer class labels, got {kind}")
    if tuple(labels.shape) != (num_images,):
        raise ValueError(f"expected {num_images} labels (one per image), got shape {tuple(labels.shape)}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) for a model with {num_classes} outputs; "
                         f"got labels in [{low}, {high}]")


def check_whole(setting: str, value: object, least: int) -> None:
    """Refuse a ``value`` of ``setting`` that is not a whole number of at least ``least``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{setting} must be a whole number of at least {least}, got {value!r}")


def check_positive(setting: str, value: object) -> None:
    """Refuse a ``value`` of ``setting`` that is not a finite number above 0, naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{setting} must be positive, got {value!r}")
