"""Experiment configuration: data, models, defences and attacks, as dataclasses read from YAML."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..attacks.suite import AttackConfig
from ..config import from_dict, load_yaml, merge

DEFENSE_KINDS = ("none", "purifier", "preprocessing", "classifier")


@dataclass
class DataConfig:
    """``root=None`` means the default data folder (``$DISTPURE_DATA`` or ``../shared/data``)."""

    dataset: str = "cifar10"
    root: str | None = None
    split: str = "test"
    limit: int | None = 256
    seed: int = 0


@dataclass
class ModelsConfig:
    """The victim and the diffusion model: registry names or local paths."""

    victim: str = "cifar10-resnet18"
    victim_arch: str | None = None
    diffusion: str = "cifar10-ddpm-small"


@dataclass
class DefenseConfig:
    """One defence. ``purifier`` overrides the recommended purifier settings; ``preprocessing``
    names a baseline (``{"name": "jpeg", "quality": 75}``); ``classifier`` replaces the victim
    (e.g. an adversarially trained model) with no purification."""

    name: str
    kind: str = "purifier"
    purifier: dict = field(default_factory=dict)
    preprocessing: dict = field(default_factory=dict)
    classifier: str | None = None
    classifier_arch: str | None = None
    votes: int = 1

    def __post_init__(self) -> None:
        if self.kind not in DEFENSE_KINDS:
            raise ValueError(f"defence {self.name!r}: unknown kind {self.kind!r}; "
                             f"expected one of {', '.join(DEFENSE_KINDS)}")


@dataclass
class ExperimentConfig:
    """A whole experiment; ``paper`` maps ``"<defence>/<attack>"`` to a reported accuracy (%)."""

    name: str = "experiment"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    defenses: list[DefenseConfig] = field(default_factory=list)
    attacks: list[AttackConfig] = field(default_factory=list)
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    precision: str = "bf16"
    paper: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.defenses = [d if isinstance(d, DefenseConfig) else from_dict(DefenseConfig, d)
                         for d in self.defenses]
        self.attacks = [a if isinstance(a, AttackConfig) else from_dict(AttackConfig, a)
                        for a in self.attacks]
        for kind, items in (("defence", self.defenses), ("attack", self.attacks)):
            names = [item.name for item in items]
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} names must be unique, got {names}")
        if not self.defenses or not self.attacks:
            raise ValueError("an experiment needs at least one defence and one attack")
        for index, attack in enumerate(self.attacks):
            if attack.start_from is not None:
                _check_start(attack, {a.name: a for a in self.attacks[:index]})


def _check_start(attack: AttackConfig, earlier: dict[str, AttackConfig]) -> None:
    """A warm start must come from an attack listed before, under the same threat model."""
    start = earlier.get(attack.start_from)
    if start is None:
        raise ValueError(f"attack {attack.name!r}: start_from {attack.start_from!r} must name an "
                         f"attack listed before it ({', '.join(earlier) or 'none'})")
    if (start.norm, start.eps) != (attack.norm, attack.eps):
        raise ValueError(f"attack {attack.name!r}: start_from {attack.start_from!r} has another "
                         "threat model (norm and eps must match)")


def load_experiment(path: str | Path, overrides: dict | None = None) -> ExperimentConfig:
    """Read an experiment YAML, apply ``overrides`` (e.g. from ``--set``), validate it."""
    values = merge(load_yaml(path), overrides or {})
    try:
        return from_dict(ExperimentConfig, values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from error
