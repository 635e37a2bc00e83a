"""ImageNet-30 (Hendrycks et al., 2019) as a subset of ImageNet-1k classes.

ImageNet-1k class indices follow the standard order (sorted wnids), as torchvision and timm use.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


# class folder name -> (wnid, ImageNet-1k class index)
IMAGENET30_CLASSES: dict[str, tuple[str, int]] = {
    "acorn": ("n12267677", 988),
    "airliner": ("n02690373", 404),
    "ambulance": ("n02701002", 407),
    "american_alligator": ("n01698640", 50),
    "banjo": ("n02787622", 420),
    "barn": ("n02793495", 425),
    "bikini": ("n02837789", 445),
    "digital_clock": ("n03196217", 530),
    "dragonfly": ("n02268443", 319),
    "dumbbell": ("n03255030", 543),
    "forklift": ("n03384352", 561),
    "goblet": ("n03443371", 572),
    "grand_piano": ("n03452741", 579),
    "hotdog": ("n07697537", 934),
    "hourglass": ("n03544143", 604),
    "manhole_cover": ("n03717622", 640),
    "mosque": ("n03788195", 668),
    "nail": ("n03804744", 677),
    "parking_meter": ("n03891332", 704),
    "pillow": ("n03938244", 721),
    "revolver": ("n04086273", 763),
    "rotary_dial_telephone": ("n03187595", 528),
    "schooner": ("n04147183", 780),
    "snowmobile": ("n04252077", 802),
    "soccer_ball": ("n04254680", 805),
    "stingray": ("n01498041", 6),
    "strawberry": ("n07745940", 949),
    "tank": ("n04389033", 847),
    "toaster": ("n04442312", 859),
    "volcano": ("n09472597", 980),
}


class ClassSubset(nn.Module):
    """Keeps only some output logits, e.g. an ImageNet-1k classifier restricted to ImageNet-30."""

    def __init__(self, network: nn.Module, class_indices: Sequence[int]) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("class_indices", torch.tensor(list(class_indices), dtype=torch.long))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images).index_select(1, self.class_indices)


def imagenet30_indices() -> list[int]:
    """ImageNet-1k indices of the 30 classes, in sorted folder-name order (the dataset's labels)."""
    return [IMAGENET30_CLASSES[name][1] for name in sorted(IMAGENET30_CLASSES)]


def imagenet30_classifier(imagenet_model: nn.Module) -> ClassSubset:
    """An ImageNet-1k classifier restricted to the ImageNet-30 logits, in label order."""
    return ClassSubset(imagenet_model, imagenet30_indices())
