"""Victim classifiers: modules from [0, 1] images to logits, addressed by name or weights path.

Normalisation always lives inside the module, so attacks and purifiers see one input space.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..registry import Registry
from .weights import load_state_dict

CLASSIFIERS: Registry[nn.Module] = Registry("classifier")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalized(nn.Module):
    """Wraps a network that expects normalised inputs so that it takes [0, 1] images."""

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network((images - self.mean) / self.std)


class ClassSubset(nn.Module):
    """Keeps only some output logits, e.g. an ImageNet-1k classifier restricted to ImageNet-30."""

    def __init__(self, network: nn.Module, class_indices: Sequence[int]) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("class_indices", torch.tensor(list(class_indices), dtype=torch.long))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images).index_select(1, self.class_indices)


def _pyautoattack_weights() -> Path:
    import pyautoattack

    return Path(pyautoattack.__file__).resolve().parent / "examples" / "model_test.pt"


@CLASSIFIERS.register("cifar10-resnet18")
def cifar10_resnet18(weights: str | Path | None = None) -> nn.Module:
    """The standard (not robust) CIFAR-10 ResNet-18 that ships with ``pyautoattack``."""
    from pyautoattack.examples.resnet import ResNet18

    network = ResNet18()
    network.load_state_dict(load_state_dict(weights or _pyautoattack_weights()))
    return network


def load_classifier(name_or_path: str | Path, arch: str | None = None,
                    num_classes: int | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """A victim in eval mode with frozen weights, from a registry name or a weights file.

    ``load_classifier("cifar10-resnet18")`` uses the registered weights;
    ``load_classifier("model.safetensors", arch="cifar10-resnet18")`` loads local weights into a
    registered architecture.
    """
    name = str(name_or_path)
    if name in CLASSIFIERS:
        model = CLASSIFIERS.build(name)
    elif arch is not None:
        model = CLASSIFIERS.build(arch, weights=Path(name))
    elif Path(name).exists():
        raise ValueError(f"{name}: a weights file needs arch=<one of {', '.join(CLASSIFIERS.names())}>")
    else:
        raise KeyError(f"unknown classifier {name!r}; known: {', '.join(CLASSIFIERS.names())}")
    model = model.to(device).eval().requires_grad_(False)
    _check_num_classes(model, num_classes, name)
    return model


def _check_num_classes(model: nn.Module, num_classes: int | None, name: str) -> None:
    if num_classes is None:
        return
    probe = next(model.parameters())
    size = 224 if num_classes > 100 else 32
    with torch.no_grad():
        outputs = model(torch.zeros(1, 3, size, size, device=probe.device)).shape[-1]
    if outputs != num_classes:
        raise ValueError(f"classifier {name!r} has {outputs} outputs but the data has {num_classes} classes")
