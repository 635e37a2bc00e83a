"""Threat models: how each attack kind crafts adversarial examples against a defence.

Kinds: ``clean`` (no attack), ``transfer`` (PGD on the undefended victim), ``pgd`` (exact
gradients through the whole defence, checkpointed per reverse step, with EOT), ``bpda``
(the defence's backward pass is the identity, with EOT), ``surrogate`` (exact gradients through
a cheaper purification than the one evaluated), ``autoattack`` (standard or rand).
With ``frozen_noise`` the defence's randomness is drawn once per sample and shared by attack
and scoring (the deterministic white-box threat model); otherwise the attacker's noise is a
stream of its own, never one the scorer uses. ``start_from`` names another attack of the
experiment whose examples are the first iterate (e.g. adaptive PGD warm-started from transfer).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import nn

from ..config import from_dict
from ..defenses.defended import DefendedClassifier
from ..defenses.purifier import PurifierConfig
from ..seeding import derive_seed
from ..validation import check_choice
from .autoattack import ATTACK_NAMES as AUTOATTACK_ATTACKS
from .autoattack import VERSIONS as AUTOATTACK_VERSIONS
from .pgd import PGDConfig, pgd

ATTACK_KINDS = ("clean", "transfer", "pgd", "bpda", "surrogate", "autoattack")


def parse_epsilon(value: float | str) -> float:
    """``8/255`` or ``0.0314`` -> float."""
    return float(Fraction(value)) if isinstance(value, str) else float(value)


@dataclass
class AttackConfig:
    """One attack of an experiment; ``eps`` accepts fractions such as ``"8/255"``. ``surrogate``
    holds the purifier settings a ``surrogate`` attack's copy changes: fewer steps, ``target:
    soft`` (another forward pass), or ``target: straight-through`` (the defence's own forward pass,
    with the soft target's derivative of the guidance)."""

    name: str
    kind: str = "pgd"
    norm: str = "linf"
    eps: float | str = "8/255"
    steps: int | None = None
    step_size: float | None = None
    eot: int | None = None
    restarts: int = 1
    loss: str = "ce"
    momentum: float = 0.0
    frozen_noise: bool = False
    checkpoint: bool = True
    surrogate: dict = field(default_factory=dict)
    version: str = "standard"
    attacks_to_run: list[str] | None = None
    start_from: str | None = None

    def __post_init__(self) -> None:
        """Every setting checked when the experiment is read, naming the bad value and the
        choices (the experiment adds which attack it is)."""
        check_choice("attack kind", self.kind, ATTACK_KINDS)
        if self.start_from is not None and self.kind in ("clean", "autoattack"):
            raise ValueError(f"start_from applies to PGD-based attacks, not {self.kind!r}")
        try:
            self.eps = parse_epsilon(self.eps)
        except (ValueError, ZeroDivisionError) as error:
            raise ValueError(f"eps must be a number or a fraction such as 8/255, got {self.eps!r}") from error
        self.pgd_config(seed=0)  # norm, loss, eps, steps, EOT and momentum: PGDConfig checks them
        if isinstance(self.restarts, bool) or not isinstance(self.restarts, int) or self.restarts < 1:
            raise ValueError(f"restarts must be a whole number of at least 1, got {self.restarts!r}")
        check_choice("AutoAttack version", self.version, AUTOATTACK_VERSIONS)
        for name in self.attacks_to_run or []:
            check_choice("AutoAttack attack", name, AUTOATTACK_ATTACKS)
        for setting, kind in (("attacks_to_run", "autoattack"), ("surrogate", "surrogate")):
            if getattr(self, setting) and self.kind != kind:
                raise ValueError(f"{setting!r} is set, but it applies to kind {kind!r}, not {self.kind!r}")
        try:  # the purifier settings the attacker's copy changes
            from_dict(PurifierConfig, self.surrogate)
        except ValueError as error:
            raise ValueError(f"surrogate settings: {error}") from error

    @property
    def iterations(self) -> int:
        """``steps``, or the attack's default: none for clean, 100 for AutoAttack (its APGD), 20
        otherwise."""
        if self.kind == "clean":
            return 0
        return self.steps if self.steps is not None else (100 if self.kind == "autoattack" else 20)

    @property
    def eot_draws(self) -> int:
        """``eot``, or the default: 20 for AutoAttack's ``rand`` version (as its authors run
        randomized defences), 1 otherwise."""
        if self.eot is not None:
            return self.eot
        return 20 if (self.kind, self.version) == ("autoattack", "rand") else 1

    def pgd_config(self, seed: int) -> PGDConfig:
        return PGDConfig(norm=self.norm, eps=self.eps, steps=self.iterations, step_size=self.step_size,
                         eot=self.eot_draws, loss=self.loss, momentum=self.momentum, seed=seed)


@dataclass
class Crafted:
    """An attack's result: the examples, the attack's own verdict where it gives one (AutoAttack:
    which samples it broke), the model that scores them under a frozen-noise threat model (the
    attacker's fixed draw), and what the attack warned about."""

    examples: torch.Tensor
    broken: torch.Tensor | None = None
    frozen_scorer: DefendedClassifier | None = None
    warnings: list[str] = field(default_factory=list)


def craft(attack: AttackConfig, defense: DefendedClassifier, images: torch.Tensor,
          labels: torch.Tensor, seed: int, start: torch.Tensor | None = None,
          sample_keys: list[int] | None = None) -> Crafted:
    """Adversarial examples for ``defense`` under ``attack`` (images in [0, 1]); PGD-based
    attacks begin at ``start`` when it is given. ``sample_keys`` (e.g. dataset indices) key the
    frozen noise of each sample. Every random stream (PGD's start, the attacker's noise, the
    frozen draw) is derived from ``seed`` under its own name."""
    if attack.kind == "clean":
        return Crafted(images)
    pgd_seed = derive_seed(seed, "pgd-start")
    if attack.kind == "transfer":
        return Crafted(pgd(defense.victim, images, labels, attack.pgd_config(pgd_seed), start))
    frozen = _frozen_defense(defense, images, sample_keys, seed) if attack.frozen_noise else None
    model = attacked_model(attack, frozen or defense, seed)
    if attack.kind == "autoattack":
        from .autoattack import run_autoattack

        result = run_autoattack(model, images, labels, norm=attack.norm, eps=attack.eps,
                                version=attack.version, iterations=attack.iterations,
                                restarts=attack.restarts, eot_iter=attack.eot_draws, seed=pgd_seed,
                                attacks_to_run=attack.attacks_to_run)
        return Crafted(result.examples, result.broken, frozen, result.warnings)
    return Crafted(pgd(model, images, labels, attack.pgd_config(pgd_seed), start), frozen_scorer=frozen)


def _frozen_defense(defense: DefendedClassifier, images: torch.Tensor, sample_keys: list[int] | None,
                    seed: int) -> DefendedClassifier | None:
    """The defence with one fixed noise draw per sample (keyed by ``sample_keys``, else by
    position), shared by the attacker and the scorer."""
    purifier = defense.purifier
    if purifier is None or not hasattr(purifier, "bind_samples"):
        return None
    keys = sample_keys if sample_keys is not None else list(range(len(images)))
    frozen = purifier.variant(frozen_noise=True, seed=derive_seed(seed, "frozen-noise"))
    return defense.with_purifier(frozen.bind_samples(images, keys))


def attacked_model(attack: AttackConfig, defense: DefendedClassifier, seed: int) -> nn.Module:
    """The model the attacker differentiates: the scored defence itself (same victim and votes)
    with the purifier as the attack runs it: whole, as BPDA, or as a surrogate."""
    purifier = defense.purifier
    if purifier is None:
        return defense.victim
    overrides = attack.surrogate if attack.kind == "surrogate" else {}
    variant = _attack_variant(purifier, attack, seed, **overrides)
    if attack.kind == "bpda":
        from .bpda import BPDA

        variant = BPDA(variant)
    return defense.with_purifier(variant)


def _attack_variant(purifier: nn.Module, attack: AttackConfig, seed: int, **overrides) -> nn.Module:
    """The purifier as the attacker runs it: checkpointed per reverse step (unless the attack
    turns it off, trading memory for speed at few steps: 1.3x at 10 in ``distpure bench``), with
    the attacker's own noise stream (a frozen-noise purifier keeps its fixed draw)."""
    if not hasattr(purifier, "variant"):
        return purifier
    if not purifier.stochastic:
        return purifier.variant(checkpoint_steps=attack.checkpoint, **overrides)
    return purifier.variant(checkpoint_steps=attack.checkpoint,
                            seed=derive_seed(seed, "attack-noise"), **overrides)
