"""Training data kept in memory as uint8 and sampled into augmented float batches."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import load_cifar10


def training_set(root: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All CIFAR-10 training images as uint8 (150 MB) and their labels."""
    data = load_cifar10(root, split="train")
    return (data.images * 255).round().to(torch.uint8), data.labels


def random_batch(images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device,
                 crop_padding: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch in [0, 1] with random horizontal flips (and random crops if padded)."""
    index = torch.randint(0, len(images), (batch_size,))
    x = images[index].to(device).float().div(255.0)
    flip = torch.rand(batch_size, device=device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if crop_padding:
        x = _random_crop(x, crop_padding)
    return x, labels[index].to(device)


def _random_crop(x: torch.Tensor, padding: int) -> torch.Tensor:
    padded = F.pad(x, [padding] * 4, mode="reflect")
    size = x.shape[-1]
    offsets = torch.randint(0, 2 * padding + 1, (len(x), 2))
    return torch.stack([padded[i, :, top:top + size, left:left + size]
                        for i, (top, left) in enumerate(offsets.tolist())])
