"""Per-step gradient checkpointing for reverse steps that take a gradient inside themselves.

A guided reverse step differentiates the guidance log-likelihood with ``create_graph``; an
attacker then differentiates through that (a second-order graph). ``torch.utils.checkpoint``
does not discard the tensors the inner ``autograd.grad`` saves, so its memory still grows with
the number of steps (about 50 MB per step for 4 CIFAR images). Here a step keeps only its inputs
during the forward pass and is rebuilt, second-order graph included, in the backward pass, so
the memory of an exact gradient no longer depends on the number of steps.
"""
from __future__ import annotations

from typing import Callable

import torch


class _RecomputedInBackward(torch.autograd.Function):
    """Runs ``step`` without a graph; rebuilds it from the saved inputs when gradients are asked."""

    @staticmethod
    def forward(ctx, step: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        ctx.step = step
        ctx.save_for_backward(*inputs)
        return step(*inputs)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        wanted = ctx.needs_input_grad[1:]
        with torch.enable_grad():
            inputs = [tensor.detach().requires_grad_(needs) for tensor, needs in zip(saved, wanted)]
            output = ctx.step(*inputs)
            differentiable = [tensor for tensor in inputs if tensor.requires_grad]
            gradients = iter(torch.autograd.grad(output, differentiable, grad_output, allow_unused=True))
        return (None, *(next(gradients) if needs else None for needs in wanted))


def recomputed_in_backward(step: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """``step(*inputs)``, storing only ``inputs`` for the backward pass, which re-runs ``step``.

    ``step`` must be deterministic given its inputs (pass noise in explicitly); it runs once with
    gradients disabled and once more, with them, only if a gradient reaches its output.
    """
    return _RecomputedInBackward.apply(step, *inputs)
