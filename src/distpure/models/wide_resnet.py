"""The CIFAR WideResNet (Zagoruyko & Komodakis, 2016) as RobustBench uses it, e.g. WRN-28-10.

Parameter names follow RobustBench's ``WideResNet`` (``conv1``, ``block1.layer.0.bn1``, ...,
``convShortcut``, ``bn1``, ``fc``) so that its checkpoints load unchanged. Inputs are
[0, 1] images without normalisation, as in RobustBench.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Pre-activation 3x3-3x3 block; a 1x1 shortcut convolution sees the activated input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.convShortcut = (nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
                             if in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        residual = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + residual


class NetworkBlock(nn.Module):
    """A stage of ``num_layers`` blocks; only the first changes width and resolution."""

    def __init__(self, num_layers: int, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*(
            BasicBlock(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1)
            for i in range(num_layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32x32 images.

    ``sub_block1`` adds the unused duplicate first stage that some RobustBench checkpoints
    (e.g. Carmon2019Unlabeled) carry, so their state dicts load strictly; it never runs.
    """

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10,
                 sub_block1: bool = False) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        layers = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, padding=1, bias=False)
        self.block1 = NetworkBlock(layers, widths[0], widths[1], 1)
        if sub_block1:
            self.sub_block1 = NetworkBlock(layers, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(layers, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(layers, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.block3(self.block2(self.block1(self.conv1(images))))
        return self.fc(F.relu(self.bn1(features)).mean(dim=(2, 3)))
