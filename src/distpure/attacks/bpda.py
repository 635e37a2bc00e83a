"""BPDA (Athalye et al. 2018): run a defence forward, differentiate through it as the identity."""
from __future__ import annotations

import torch
from torch import nn


class _StraightThrough(torch.autograd.Function):
    """Forward: ``module(images)`` without building its graph; backward: the identity."""

    @staticmethod
    def forward(ctx, images: torch.Tensor, module: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return module(images)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output, None


class BPDA(nn.Module):
    """Wraps a [0, 1] -> [0, 1] defence of same-shaped output so that its gradient is the identity."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(images, self.module)
