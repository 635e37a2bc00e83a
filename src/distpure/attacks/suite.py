"""Crafting: an attack of an experiment as configured (``AttackConfig``, in base.py), crafted by
the class registered for its kind (``kinds``: clean, transfer, pgd, bpda, surrogate, apgd,
autoattack). Importing this module registers the kinds, so every experiment reads through it.
"""
from __future__ import annotations

import torch

from ..defenses.defended import DefendedClassifier
from . import kinds  # noqa: F401  (registers the attack kinds)
from .base import ATTACKS, AttackConfig, Crafted
from .pgd import ProgressStore


def resumable(attack: AttackConfig) -> bool:
    """Whether ``attack``'s kind resumes mid-way from a progress store (the PGD kinds)."""
    return ATTACKS.build(attack.kind, config=attack).resumable


def craft(attack: AttackConfig, defense: DefendedClassifier, images: torch.Tensor,
          labels: torch.Tensor, seed: int, start: torch.Tensor | None = None,
          sample_keys: list[int] | None = None, frozen_seed: int | None = None,
          progress: ProgressStore | None = None) -> Crafted:
    """Adversarial examples for ``defense`` under ``attack``, by the class registered for its
    kind (see ``kinds`` and ``Attack.perturb``; ``progress`` lets a PGD kind resume mid-attack)."""
    return ATTACKS.build(attack.kind, config=attack).perturb(defense, images, labels, seed, start,
                                                             sample_keys, frozen_seed, progress)
