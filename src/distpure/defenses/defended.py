"""A victim behind a purifier, as one module from [0, 1] images to logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import check_unit_images


class DefendedClassifier(nn.Module):
    """``victim(purifier(x))``; with ``votes > 1`` the class probabilities of several
    independent purifications are averaged and returned as log-probabilities (valid logits)."""

    def __init__(self, victim: nn.Module, purifier: nn.Module | None, votes: int = 1) -> None:
        super().__init__()
        if votes < 1:
            raise ValueError(f"votes must be at least 1, got {votes}")
        self.victim = victim
        self.purifier = purifier
        self.votes = votes

    @property
    def stochastic(self) -> bool:
        """Whether its predictions are random (a purifier or preprocessing with fresh noise)."""
        return bool(getattr(self.purifier, "stochastic", False))

    @property
    def denoiser_calls(self) -> int:
        """Denoiser (UNet) forward passes per image of one classification: the purifier's
        reverse steps times the votes (0 without a diffusion purifier). The Pareto report's cost
        axis; victim guidance adds, per step, a classifier forward and backward (cheaper than
        the UNet's), which this count leaves out."""
        return len(getattr(self.purifier, "timesteps", ())) * self.votes

    def with_noise_stream(self, seed: int) -> "DefendedClassifier":
        """This defence drawing its noise from a stream of its own (``seed``); itself where
        nothing is random. A random purifier without ``variant(seed=...)`` is refused: its
        copies would share one stream, so an attacker could replay the draws that score it."""
        if not self.stochastic:
            return self
        return self.with_purifier(own_stream(self.purifier).variant(seed=seed))

    def with_purifier(self, purifier: nn.Module | None) -> "DefendedClassifier":
        """The same victim and votes behind another purifier (e.g. the attacker's variant):
        attacker and scorer attack and score the same defence."""
        return DefendedClassifier(self.victim, purifier, self.votes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_unit_images(images)
        if self.purifier is None:
            return self.victim(images)
        if self.votes == 1:
            return self.victim(self.purifier(images))
        probabilities = torch.stack([F.softmax(self.victim(self.purifier(images)).float(), dim=1)
                                     for _ in range(self.votes)]).mean(0)
        return probabilities.clamp_min(1e-12).log()


def own_stream(purifier: nn.Module) -> nn.Module:
    """``purifier``, checked to be able to draw a noise stream of its own (``variant(seed=...)``)
    if it draws noise at all."""
    if getattr(purifier, "stochastic", False) and not hasattr(purifier, "variant"):
        raise ValueError(f"{type(purifier).__name__} draws random noise but has no variant(seed=...) "
                         "method: the attacker, the selection draws and the scoring draws would share "
                         "one noise stream; give it a variant that returns a copy seeded by its argument")
    return purifier
