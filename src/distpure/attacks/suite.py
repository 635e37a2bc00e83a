"""Threat models: how each attack kind crafts adversarial examples against a defence.

Kinds: ``clean`` (no attack), ``transfer`` (PGD on the undefended victim), ``pgd`` (exact
gradients through the whole defence, checkpointed per reverse step, with EOT), ``bpda``
(the defence's backward pass is the identity, with EOT), ``surrogate`` (exact gradients through
a cheaper purification than the one evaluated), ``autoattack`` (standard or rand).
With ``frozen_noise`` the defence's randomness is drawn once and shared by attack and
evaluation (deterministic white-box threat model). ``start_from`` names another attack of the
experiment whose examples are the first iterate (e.g. adaptive PGD warm-started from transfer).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import nn

from ..defenses.defended import DefendedClassifier
from .pgd import PGDConfig, pgd

ATTACK_KINDS = ("clean", "transfer", "pgd", "bpda", "surrogate", "autoattack")


def parse_epsilon(value: float | str) -> float:
    """``8/255`` or ``0.0314`` -> float."""
    return float(Fraction(value)) if isinstance(value, str) else float(value)


@dataclass
class AttackConfig:
    """One attack of an experiment; ``eps`` accepts fractions such as ``"8/255"``."""

    name: str
    kind: str = "pgd"
    norm: str = "linf"
    eps: float | str = "8/255"
    steps: int = 20
    step_size: float | None = None
    eot: int = 1
    loss: str = "ce"
    momentum: float = 0.0
    frozen_noise: bool = False
    checkpoint: bool = True
    surrogate: dict = field(default_factory=dict)
    version: str = "standard"
    attacks_to_run: list[str] | None = None
    start_from: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ATTACK_KINDS:
            raise ValueError(f"attack {self.name!r}: unknown kind {self.kind!r}; "
                             f"expected one of {', '.join(ATTACK_KINDS)}")
        if self.start_from is not None and self.kind in ("clean", "autoattack"):
            raise ValueError(f"attack {self.name!r}: start_from applies to PGD-based attacks, "
                             f"not {self.kind!r}")
        self.eps = parse_epsilon(self.eps)

    def pgd_config(self, seed: int) -> PGDConfig:
        return PGDConfig(norm=self.norm, eps=self.eps, steps=self.steps, step_size=self.step_size,
                         eot=self.eot, loss=self.loss, momentum=self.momentum, seed=seed)


def defence_seed(attack: AttackConfig, seed: int, role: str) -> int:
    """Seed of the defence's noise for the ``attack`` or the ``evaluation`` role: frozen noise
    is one draw shared by both; otherwise each role has its own stream, so that the attacker
    never sees the draws its examples are scored with."""
    if role not in ("attack", "evaluation"):
        raise ValueError(f"role must be 'attack' or 'evaluation', got {role!r}")
    if attack.frozen_noise:
        return seed
    return seed + (1 if role == "attack" else 2)


def evaluation_model(defense: DefendedClassifier, attack: AttackConfig, seed: int) -> DefendedClassifier:
    """The defence whose prediction is scored, for examples crafted with ``seed``: fresh
    randomness, or the attacker's frozen noise."""
    purifier = defense.purifier
    if purifier is None or not hasattr(purifier, "variant"):
        return defense
    variant = purifier.variant(seed=defence_seed(attack, seed, "evaluation"), frozen_noise=attack.frozen_noise)
    return DefendedClassifier(defense.victim, variant, defense.votes)


def craft(attack: AttackConfig, defense: DefendedClassifier, images: torch.Tensor,
          labels: torch.Tensor, seed: int, start: torch.Tensor | None = None) -> torch.Tensor:
    """Adversarial examples for ``defense`` under ``attack`` (images in [0, 1]); PGD-based
    attacks begin at ``start`` when it is given."""
    if attack.kind == "clean":
        return images
    if attack.kind == "transfer":
        return pgd(defense.victim, images, labels, attack.pgd_config(seed), start)
    if attack.kind == "autoattack":
        from .autoattack import run_autoattack

        return run_autoattack(_attacked_model(attack, defense, seed), images, labels,
                              norm="Linf" if attack.norm == "linf" else "L2", eps=attack.eps,
                              version=attack.version, eot_iter=attack.eot, seed=seed,
                              attacks_to_run=attack.attacks_to_run)
    return pgd(_attacked_model(attack, defense, seed), images, labels, attack.pgd_config(seed), start)


def _attacked_model(attack: AttackConfig, defense: DefendedClassifier, seed: int) -> nn.Module:
    """The model the attacker differentiates: the whole defence, BPDA, or a surrogate of it."""
    purifier = defense.purifier
    if purifier is None:
        return defense.victim
    if attack.kind == "bpda":
        from .bpda import BPDA

        return DefendedClassifier(defense.victim, BPDA(_attack_variant(purifier, attack, seed)))
    overrides = attack.surrogate if attack.kind == "surrogate" else {}
    return DefendedClassifier(defense.victim, _attack_variant(purifier, attack, seed, **overrides))


def _attack_variant(purifier: nn.Module, attack: AttackConfig, seed: int, **overrides) -> nn.Module:
    """The purifier as the attacker runs it: checkpointed per reverse step (unless the attack
    turns it off, trading memory for speed at few steps: 1.3x at 10 in ``distpure bench``), with
    its own (or the frozen) noise."""
    if not hasattr(purifier, "variant"):
        return purifier
    return purifier.variant(checkpoint_steps=attack.checkpoint, frozen_noise=attack.frozen_noise,
                            seed=defence_seed(attack, seed, "attack"), **overrides)
