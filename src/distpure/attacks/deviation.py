"""DiffAttack's deviated-reconstruction loss (Kang, Song & Li, NeurIPS 2023, Sec. 3.2): push the
purifier's reverse-process states x'_t away from the forward-process states x_t of the same
input, averaged uniformly over the reverse steps, so that the diffusion model's denoising goes
wrong along the way (where the classifier's gradient through many steps is weak).

distpure compares x'_t with the mean of the forward marginal, sqrt(ᾱ_t) x (x the attacked
input in [-1, 1]), rather than with one forward draw. The steps ascend CE (or DLR) + λ · L_dev;
the iterate kept is still the one with the highest classification loss.
"""
from __future__ import annotations

import torch
from torch import nn

from ..defenses.defended import DefendedClassifier
from ..defenses.purifier import ReverseState


def deviation(trajectory: list[ReverseState], images: torch.Tensor) -> torch.Tensor:
    """Per sample, the mean over reverse steps of the mean squared distance between the state
    reached and sqrt(ᾱ) times the input (``images`` in [0, 1], rows as the trajectory's)."""
    x_input = images * 2.0 - 1.0
    per_step = [(state.x.float() - state.alpha_bar.float().sqrt() * x_input).square().flatten(1).mean(1)
                for state in trajectory]
    return torch.stack(per_step).mean(0)


class DeviatedReconstruction(nn.Module):
    """A purifying defence as DiffAttack attacks it: its logits, and after each call an
    ``auxiliary_loss`` per row, λ times the deviation of every purification in the call (the
    mean over votes), which PGD adds to its classification loss."""

    def __init__(self, defense: DefendedClassifier, weight: float) -> None:
        super().__init__()
        if not hasattr(defense.purifier, "trajectories"):
            raise ValueError("the deviated-reconstruction loss needs a diffusion purifier "
                             f"(got {type(defense.purifier).__name__})")
        self.defense = defense
        self.weight = weight
        self.auxiliary_loss: torch.Tensor | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with self.defense.purifier.trajectories() as calls:
            logits = self.defense(images)
        self.auxiliary_loss = self.weight * torch.stack([deviation(call, images) for call in calls]).mean(0)
        return logits
