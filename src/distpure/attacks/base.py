"""What an attack is: its settings as an experiment gives them (``AttackConfig``), its result
(``Crafted``) and one small class per kind, registered by name (as AutoAttack's and
torchattacks' attacks are), whose ``perturb`` crafts one batch's examples against a defence.

Threat models: with ``frozen_noise`` the defence's randomness is drawn once per sample and
shared by attack and scoring (the deterministic white-box threat model); otherwise the
attacker's noise is a stream of its own, never one the scorer uses. ``start_from`` names another
attack of the experiment whose examples are the first iterate (e.g. adaptive PGD warm-started
from transfer).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import torch

from ..config import from_dict
from ..defenses.defended import DefendedClassifier
from ..defenses.purifier import PurifierConfig
from ..registry import Registry
from ..validation import check_choice
from .autoattack import ATTACK_NAMES as AUTOATTACK_ATTACKS
from .autoattack import VERSIONS as AUTOATTACK_VERSIONS
from .pgd import PGDConfig, ProgressStore

# The losses APGD maximises (its cross-entropy and difference-of-logits-ratio variants).
APGD_LOSSES = ("ce", "dlr")


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

    def __init__(self, config: AttackConfig) -> None:
        self.config = config

    def perturb(self, defense: DefendedClassifier, images: torch.Tensor, labels: torch.Tensor,
                seed: int, start: torch.Tensor | None = None, sample_keys: list[int] | None = None,
                frozen_seed: int | None = None, progress: ProgressStore | None = None) -> Crafted:
        """Examples for ``defense`` (images in [0, 1]); iterative attacks begin at ``start`` when
        given. Under frozen noise each sample's fixed draw comes from ``frozen_seed`` (one per
        defence, so that every frozen attack of a threat group meets the same draw; derived from
        ``seed`` if not given) and its key in ``sample_keys`` (e.g. its dataset index). The PGD
        kinds keep their progress in ``progress`` and resume from it (``pgd.pgd``); the others,
        one-shot or run by pyautoattack, ignore it (``resumable`` False)."""
        raise NotImplementedError


ATTACKS: Registry[Attack] = Registry("attack kind")


# What a surrogate attack may change in its copy of the purifier (the defence it approximates).
SURROGATE_SETTINGS = ("t_star", "num_steps", "eta", "guidance", "victim_scale", "mse_scale", "schedule",
                      "target", "soft_temperature", "guidance_through_denoiser", "clip_x0", "sampler", "dt")


def parse_epsilon(value: float | str) -> float:
    """``8/255`` or ``0.0314`` -> float."""
    return float(Fraction(value)) if isinstance(value, str) else float(value)


@dataclass
class AttackConfig:
    """One attack of an experiment; ``eps`` accepts fractions such as ``"8/255"``. ``surrogate``
    holds the purifier settings a ``surrogate`` attack's copy changes: fewer steps, ``guidance:
    none`` (the unguided copy: DiffPure's gradient), ``target: soft`` with ``soft_temperature``
    below 1 (a smooth relaxation of the hard target; at 1 the soft target shifts nothing), or
    ``target: straight-through`` (the defence's own forward pass, its guidance shift held
    constant in the derivative). ``deviation`` > 0 adds DiffAttack's
    deviated-reconstruction loss with that weight λ (1.0 in the paper) to PGD's loss.
    ``defenses`` limits the attack to the defences named (e.g. an unguided surrogate to the
    victim-guided ones, where it differs from exact PGD)."""

    name: str
    kind: str = "pgd"
    norm: str = "linf"
    eps: float | str = "8/255"
    steps: int | None = None
    step_size: float | None = None
    eot: int | None = None
    eot_batch: int = 1
    holdout_draws: int = 0
    restarts: int = 1
    loss: str = "ce"
    deviation: float = 0.0
    momentum: float = 0.0
    frozen_noise: bool = False
    checkpoint: bool = True
    surrogate: dict = field(default_factory=dict)
    version: str = "standard"
    attacks_to_run: list[str] | None = None
    start_from: str | None = None
    defenses: list[str] | None = None

    def __post_init__(self) -> None:
        """Every setting checked when the experiment is read, naming the bad value and the
        choices (the experiment adds which attack it is)."""
        check_choice("attack kind", self.kind, ATTACKS.names())
        if self.start_from is not None and self.kind in ("clean", "autoattack"):
            raise ValueError(f"start_from applies to PGD-based attacks, not {self.kind!r}")
        try:
            self.eps = parse_epsilon(self.eps)
        except (ValueError, ZeroDivisionError) as error:
            raise ValueError(f"eps must be a number or a fraction such as 8/255, got {self.eps!r}") from error
        self.pgd_config(seed=0)  # norm, loss, eps, steps, EOT and momentum: PGDConfig checks them
        if isinstance(self.restarts, bool) or not isinstance(self.restarts, int) or self.restarts < 1:
            raise ValueError(f"restarts must be a whole number of at least 1, got {self.restarts!r}")
        if self.kind == "apgd":
            check_choice("apgd loss", self.loss, APGD_LOSSES)
        if isinstance(self.deviation, bool) or not isinstance(self.deviation, (int, float)) or self.deviation < 0:
            raise ValueError(f"deviation (DiffAttack's λ) must be a number of at least 0, got {self.deviation!r}")
        if self.deviation and self.kind not in ("pgd", "surrogate"):
            raise ValueError(f"deviation (DiffAttack's loss) needs exact gradients through the reverse "
                             f"steps: kind 'pgd' or 'surrogate', not {self.kind!r}")
        check_choice("AutoAttack version", self.version, AUTOATTACK_VERSIONS)
        for name in self.attacks_to_run or []:
            check_choice("AutoAttack attack", name, AUTOATTACK_ATTACKS)
        for setting, kind in (("attacks_to_run", "autoattack"), ("surrogate", "surrogate")):
            if getattr(self, setting) and self.kind != kind:
                raise ValueError(f"{setting!r} is set, but it applies to kind {kind!r}, not {self.kind!r}")
        unknown = sorted(set(self.surrogate) - set(SURROGATE_SETTINGS))
        if unknown:  # noise, checkpointing and speed settings belong to the threat model, not the copy
            raise ValueError(f"surrogate settings {', '.join(unknown)} cannot be changed; a surrogate "
                             f"changes only {', '.join(SURROGATE_SETTINGS)}")
        try:  # the purifier settings the attacker's copy changes
            from_dict(PurifierConfig, self.surrogate)
        except ValueError as error:
            raise ValueError(f"surrogate settings: {error}") from error

    def applies_to(self, defense: str) -> bool:
        """Whether this attack runs against ``defense`` (``defenses`` names them; None: all)."""
        return self.defenses is None or defense in self.defenses

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
                         eot=self.eot_draws, loss=self.loss, momentum=self.momentum,
                         eot_batch=self.eot_batch, holdout_draws=self.holdout_draws, seed=seed)
