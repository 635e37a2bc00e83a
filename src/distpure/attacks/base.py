"""What every attack kind is: one small class, registered by name (as AutoAttack's and
torchattacks' attacks are), whose ``perturb`` crafts one batch's examples against a defence."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..defenses.defended import DefendedClassifier
from ..registry import Registry

if TYPE_CHECKING:
    from .pgd import ProgressStore
    from .suite import AttackConfig


@dataclass
class Crafted:
    """An attack's result: the examples, the attack's own verdict where it gives one (AutoAttack:
    which samples it broke), the model that scores them under a frozen-noise threat model (the
    attacker's fixed draw), what the attack warned about, its convergence trace (per
    iteration: mean loss and accuracy on its own draws) and, where it has one, what it would have
    returned at the start of its last quarter (``late_examples``: scored like the final examples,
    the difference is what the last quarter gained) and the examples it started from (``start``,
    a warm start, where it had one)."""

    examples: torch.Tensor
    broken: torch.Tensor | None = None
    frozen_scorer: DefendedClassifier | None = None
    warnings: list[str] = field(default_factory=list)
    trace: list[dict] = field(default_factory=list)
    late_examples: torch.Tensor | None = None
    start: torch.Tensor | None = None


class Attack:
    """Crafts adversarial examples as one ``AttackConfig`` says. Every random stream (PGD's
    start, the attacker's noise, the frozen draw) is derived from the ``seed`` given to
    ``perturb`` under its own name, so no two share one. ``resumable`` kinds keep their progress
    in the ``progress`` store given to ``perturb`` and resume from it."""

    resumable = False

    def __init__(self, config: "AttackConfig") -> None:
        self.config = config

    def perturb(self, defense: DefendedClassifier, images: torch.Tensor, labels: torch.Tensor,
                seed: int, start: torch.Tensor | None = None, sample_keys: list[int] | None = None,
                frozen_seed: int | None = None, progress: "ProgressStore | None" = None) -> Crafted:
        """Examples for ``defense`` (images in [0, 1]); iterative attacks begin at ``start`` when
        given. Under frozen noise each sample's fixed draw comes from ``frozen_seed`` (one per
        defence, so that every frozen attack of a threat group meets the same draw; derived from
        ``seed`` if not given) and its key in ``sample_keys`` (e.g. its dataset index). The PGD
        kinds keep their progress in ``progress`` and resume from it (``pgd.pgd``); the others,
        one-shot or run by pyautoattack, ignore it (``resumable`` False)."""
        raise NotImplementedError


ATTACKS: Registry[Attack] = Registry("attack kind")
