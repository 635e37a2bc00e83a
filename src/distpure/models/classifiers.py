"""Victim classifiers: modules from [0, 1] images to logits, addressed by name or weights path.

Normalisation always lives inside the module, so attacks and purifiers see one input space.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..registry import Registry, build_from_spec, is_callable_spec
from .imagenet30 import imagenet30_classifier
from .robustbench_zoo import robustbench_classifier
from .weights import load_state_dict

CLASSIFIERS: Registry[nn.Module] = Registry("classifier")
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX = "timm:"
ROBUSTBENCH_PREFIX = "robustbench:"
NAME_FORMS = f"{TIMM_PREFIX}<model>, {ROBUSTBENCH_PREFIX}<zoo model>, package.module:callable"


class Normalized(nn.Module):
    """Wraps a network that expects normalised inputs so that it takes [0, 1] images."""

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network((images - self.mean) / self.std)


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


def _with_weights(build: Callable[[bool], nn.Module], weights: str | Path | None,
                  name: str) -> nn.Module:
    """``build(False)`` with local ``weights`` loaded, else ``build(True)`` (a pretrained download)."""
    if weights is not None:
        network = build(False)
        network.load_state_dict(load_state_dict(weights))
        return network
    try:
        return build(True)
    except OSError as error:
        raise RuntimeError(f"could not download pretrained weights for {name!r} ({error}); pass a "
                           f"local weights file: load_classifier({name!r}, weights=<path>)") from error


def _torchvision_imagenet(model_name: str, weights: str | Path | None) -> nn.Module:
    """A torchvision ImageNet-1k model taking [0, 1] images."""
    from torchvision.models import get_model

    def build(pretrained: bool) -> nn.Module:
        return get_model(model_name, weights="DEFAULT" if pretrained else None)

    return Normalized(_with_weights(build, weights, model_name), IMAGENET_MEAN, IMAGENET_STD)


@CLASSIFIERS.register("cifar10-small-resnet")
def cifar10_small_resnet(weights: str | Path | None = None) -> nn.Module:
    """A 1.2 M-parameter pre-activation ResNet (CIFAR normalisation inside); random if no weights."""
    from .small_resnet import SmallResNet

    model = Normalized(SmallResNet(), CIFAR10_MEAN, CIFAR10_STD)
    if weights is not None:
        model.load_state_dict(load_state_dict(weights))
    return model


@CLASSIFIERS.register("cifar10-small-resnet-at")
def cifar10_small_resnet_at(weights: str | Path | None = None) -> nn.Module:
    """The embedded PGD adversarially trained baseline (``distpure train-classifier``)."""
    return cifar10_small_resnet(weights or WEIGHTS_DIR / "cifar10-small-resnet-at" / "model.safetensors")


@CLASSIFIERS.register("imagenet-resnet50")
def imagenet_resnet50(weights: str | Path | None = None) -> nn.Module:
    """torchvision's ImageNet-1k ResNet-50 (local weights, else its pretrained download)."""
    return _torchvision_imagenet("resnet50", weights)


@CLASSIFIERS.register("imagenet-wide-resnet50-2")
def imagenet_wide_resnet50_2(weights: str | Path | None = None) -> nn.Module:
    """torchvision's ImageNet-1k Wide ResNet-50-2 (local weights, else its pretrained download)."""
    return _torchvision_imagenet("wide_resnet50_2", weights)


@CLASSIFIERS.register("imagenet30-resnet50")
def imagenet30_resnet50(weights: str | Path | None = None) -> nn.Module:
    """ImageNet-1k ResNet-50 (``weights`` as for imagenet-resnet50) restricted to ImageNet-30."""
    return imagenet30_classifier(imagenet_resnet50(weights))


def timm_classifier(model_name: str, weights: str | Path | None = None, **options: Any) -> nn.Module:
    """A timm model taking [0, 1] images, normalised with its pretrained_cfg mean and std;
    ``options`` go to ``timm.create_model``."""
    try:
        import timm
    except ImportError as error:
        raise ImportError(f"{TIMM_PREFIX}{model_name} needs timm: pip install timm "
                          "(or pip install 'distpure[zoo]')") from error
    network = _with_weights(
        lambda pretrained: timm.create_model(model_name, pretrained=pretrained, **options),
        weights, f"{TIMM_PREFIX}{model_name}")
    return Normalized(network, network.pretrained_cfg["mean"], network.pretrained_cfg["std"])


def user_classifier(spec: str, weights: str | Path | None = None, **options: Any) -> nn.Module:
    """Your own classifier: ``package.module:callable`` called with ``options``, which must
    return an ``nn.Module`` on [0, 1] images; local ``weights`` are loaded into it if given."""
    network = build_from_spec(spec, nn.Module, "classifier", **options)
    if weights is not None:
        network.load_state_dict(load_state_dict(weights))
    return network


PREFIXED_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    TIMM_PREFIX: timm_classifier, ROBUSTBENCH_PREFIX: robustbench_classifier}


def is_classifier_name(name: str) -> bool:
    """Whether ``name`` is a registered classifier, a prefixed zoo name or a ``module:callable``."""
    return name in CLASSIFIERS or name.startswith(tuple(PREFIXED_BUILDERS)) or is_callable_spec(name)


def check_arch(setting: str, arch: str | None) -> None:
    """Refuse an ``arch`` (the architecture a weights file loads into) that names no classifier."""
    if arch is not None and not (isinstance(arch, str) and is_classifier_name(arch)):
        raise ValueError(f"unknown {setting} {arch!r}; expected one of {', '.join(CLASSIFIERS.names())}, "
                         f"or {NAME_FORMS}")


def _build(name: str, weights: str | Path | None, options: dict[str, Any]) -> nn.Module:
    """The classifier called ``name``, with local ``weights`` if given, built with ``options``."""
    for prefix, build in PREFIXED_BUILDERS.items():
        if name.startswith(prefix):
            return build(name[len(prefix):], weights, **options)
    if is_callable_spec(name):
        return user_classifier(name, weights, **options)
    return CLASSIFIERS.build(name, weights=weights, **options)


def load_classifier(name_or_path: str | Path, arch: str | None = None,
                    num_classes: int | None = None, device: str | torch.device = "cpu",
                    weights: str | Path | None = None, **options: Any) -> nn.Module:
    """A victim in eval mode with frozen weights, from a name or a weights file.

    Names are the registered ones, ``timm:<timm model>``, ``robustbench:<zoo model>`` or
    ``package.module:callable`` (your builder of an ``nn.Module`` on [0, 1] images).
    ``options`` go to the builder: ``dataset``, ``threat_model`` and ``model_dir`` for
    RobustBench, ``timm.create_model``'s keywords, or your callable's.
    ``load_classifier("cifar10-resnet18")`` uses the default weights (bundled, or the library's
    pretrained download); ``load_classifier("robustbench:Standard", model_dir="models")`` reads
    ``models/cifar10/Linf/Standard.pt``; ``load_classifier("model.safetensors",
    arch="timm:resnet18")`` loads local weights into an architecture.
    """
    name = str(name_or_path)
    if is_classifier_name(name):
        model = _build(name, weights, options)
    elif arch is not None:
        model = _build(arch, Path(name), options)
    elif Path(name).exists():
        raise ValueError(f"{name}: a weights file needs arch=<one of {', '.join(CLASSIFIERS.names())}, "
                         f"or {NAME_FORMS}>")
    else:
        raise KeyError(f"unknown classifier {name!r}; known: {', '.join(CLASSIFIERS.names())}, "
                       f"{NAME_FORMS}")
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
