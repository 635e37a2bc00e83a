"""Experiment configuration: data, models, defences and attacks, as dataclasses read from YAML."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, TypeVar

from torch import nn

from ..attacks.suite import AttackConfig
from ..config import from_dict, load_yaml, merge
from ..defenses.preprocessing import build_preprocessing
from ..defenses.purifier import PurifierConfig
from ..defenses.recommended import recommended_purifier_config
from ..devices import check_precision
from ..models.classifiers import check_arch
from ..validation import check_choice
from .protocol import SCORINGS

DEFENSE_KINDS = ("none", "purifier", "preprocessing", "classifier")


@dataclass
class DataConfig:
    """``root=None`` means the default data folder (``$DISTPURE_DATA`` or ``../shared/data``).
    The images are the first ``limit`` of the split in a seeded random order, after skipping
    ``start`` of them: ``start: 512`` gives a tuning subset disjoint from a reporting run's
    ``limit: 512`` (same seed). ``size`` resizes (shorter side) and centre-crops image folders
    to ``size`` pixels; ImageNet-30 defaults to 256, a folder to the images' own size."""

    dataset: str = "cifar10"
    root: str | None = None
    split: str = "test"
    limit: int | None = 256
    seed: int = 0
    start: int = 0
    size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise ValueError(f"data.start must be a whole number of at least 0, got {self.start!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or self.limit < 1):
            raise ValueError(f"data.limit must be a whole number of at least 1 (or null for all), "
                             f"got {self.limit!r}")
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int)
                                      or self.size < 8):
            raise ValueError(f"data.size must be a whole number of at least 8 pixels (or null), got {self.size!r}")
        if self.size is not None and self.dataset == "cifar10":
            raise ValueError("data.size resizes image folders (imagenet30, folder); CIFAR-10 stays 32x32")


@dataclass
class ModelsConfig:
    """The victim and the diffusion model: names (registered, ``timm:<model>``,
    ``robustbench:<zoo model>``, your ``package.module:callable``) or local paths.
    ``victim_arch``: the architecture (a classifier name) that a weights file in ``victim``
    loads into, e.g. a fine-tuned ``cifar10-resnet18``. ``victim_options`` are the victim
    builder's keywords (RobustBench: ``dataset``, ``threat_model``, ``model_dir``)."""

    victim: str = "cifar10-resnet18"
    victim_arch: str | None = None
    victim_options: dict = field(default_factory=dict)
    diffusion: str = "cifar10-ddpm-small"

    def __post_init__(self) -> None:
        check_arch("models.victim_arch", self.victim_arch)


@dataclass
class DefenseConfig:
    """One defence. ``purifier`` overrides the recommended purifier settings and ``diffusion``
    the experiment's diffusion model (to compare models on the same images); ``preprocessing``
    names a baseline (``{"name": "jpeg", "quality": 75}``); ``classifier`` replaces the victim
    (e.g. an adversarially trained model, ``robustbench:<zoo model>``) with no purification,
    built with ``classifier_options`` as ``models.victim`` is with ``victim_options``."""

    name: str
    kind: str = "purifier"
    purifier: dict = field(default_factory=dict)
    preprocessing: dict = field(default_factory=dict)
    classifier: str | None = None
    classifier_arch: str | None = None
    classifier_options: dict = field(default_factory=dict)
    diffusion: str | None = None
    votes: int = 1

    def __post_init__(self) -> None:
        check_choice("defence kind", self.kind, DEFENSE_KINDS)
        if self.votes < 1:
            raise ValueError(f"votes must be at least 1, got {self.votes}")
        for kind in ("purifier", "preprocessing", "classifier"):
            if getattr(self, kind) and self.kind != kind:
                raise ValueError(f"{kind!r} is set, but it applies to kind {kind!r}, not {self.kind!r}")
        if self.diffusion == "":
            raise ValueError("diffusion must name a model (or be left out for models.diffusion), got ''")
        if self.diffusion is not None and self.kind != "purifier":
            raise ValueError(f"'diffusion' is set, but only a purifier uses one, not kind {self.kind!r}")
        if self.purifier.get("frozen_noise"):
            raise ValueError("frozen_noise is a threat model: set it on the attacks (attack.frozen_noise), "
                             "which fix one draw per sample shared by attacker and scorer")
        check_arch("classifier_arch", self.classifier_arch)
        if self.kind == "classifier" and not self.classifier:
            raise ValueError("kind 'classifier' needs 'classifier' (the model that replaces the victim)")
        if self.kind == "preprocessing":
            self.build_preprocessing()  # a bad name, option or value fails now, not in the run

    def build_preprocessing(self) -> nn.Module:
        """The ``preprocessing`` module: ``name`` (jpeg, bit-depth, ...) and its options."""
        options = dict(self.preprocessing)
        return build_preprocessing(options.pop("name", None), **options)


@dataclass
class EvaluationConfig:
    """How examples are scored (see ``protocol``): ``draws`` (R) independent purifications per
    example whose noise no attacker saw, ``selection_draws`` more of a stream of their own (the
    attacker's queries, which pick its submission among an attack group's candidates and decide
    what the cascade skips), and the ``headline`` scoring that tables and plots lead with
    (expected, worst or majority; all three are always reported). With ``cascade`` each attack
    of a threat group attacks only the samples no earlier one broke (see ``cascade``)."""

    draws: int = 10
    selection_draws: int = 16
    headline: str = "expected"
    cascade: bool = False

    def __post_init__(self) -> None:
        for name in ("draws", "selection_draws"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"evaluation.{name} must be a whole number of at least 1, got {value!r}")
        if not isinstance(self.cascade, bool):
            raise ValueError(f"evaluation.cascade must be true or false, got {self.cascade!r}")
        if self.headline not in SCORINGS:
            raise ValueError(f"evaluation.headline must be one of {', '.join(SCORINGS)}, "
                             f"got {self.headline!r}")


#: settings of an experiment that change how its results are presented, not any record: a run
#: may be resumed with them changed
PRESENTATION_FIELDS = ("description", "paper", "baseline")


@dataclass
class ExperimentConfig:
    """A whole experiment; ``paper`` maps ``"<defence>/<attack>"`` to a reported accuracy (%);
    ``baseline`` names the defence every other one is compared with, paired, in the report."""

    name: str = "experiment"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    defenses: list[DefenseConfig] = field(default_factory=list)
    attacks: list[AttackConfig] = field(default_factory=list)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    paper: dict = field(default_factory=dict)
    baseline: str | None = None

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a whole number of at least 1, got {self.batch_size!r}")
        if isinstance(self.evaluation, dict):
            self.evaluation = from_dict(EvaluationConfig, self.evaluation)
        self.defenses = _build_items(DefenseConfig, self.defenses, "defence")
        self.attacks = _build_items(AttackConfig, self.attacks, "attack")
        for defense in self.defenses:
            if defense.kind == "purifier":
                with _naming(f"defence {defense.name!r}: purifier settings"):
                    self.purifier_config(defense)
        for kind, items in (("defence", self.defenses), ("attack", self.attacks)):
            names = [item.name for item in items]
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} names must be unique, got {names}")
        if not self.defenses or not self.attacks:
            raise ValueError("an experiment needs at least one defence and one attack")
        defense_names = [d.name for d in self.defenses]
        if self.baseline is not None:
            check_choice("baseline defence", self.baseline, defense_names)
        for index, attack in enumerate(self.attacks):
            for name in attack.defenses or []:
                check_choice(f"attack {attack.name!r}: defence", name, defense_names)
            if attack.start_from is not None:
                _check_start(attack, {a.name: a for a in self.attacks[:index]}, defense_names,
                             self.evaluation.cascade)
            if attack.deviation:
                unfit = [d.name for d in self.defenses if d.kind != "purifier" and attack.applies_to(d.name)]
                if unfit:
                    raise ValueError(f"attack {attack.name!r}: deviation (DiffAttack's loss) needs a diffusion "
                                     f"purifier; limit it with 'defenses' to leave out {', '.join(unfit)}")

    def diffusion_for(self, defense: DefenseConfig) -> str:
        """The diffusion model a ``purifier`` defence runs: its own, else the experiment's."""
        return defense.diffusion or self.models.diffusion

    def purifier_config(self, defense: DefenseConfig) -> PurifierConfig:
        """The purifier settings a ``purifier`` defence runs with: the dataset's recommended
        settings, the experiment's ``precision``, then the defence's own overrides."""
        options = {"precision": self.precision, **defense.purifier}
        return recommended_purifier_config(self.data.dataset, options.pop("guidance", "victim"), **options)


Item = TypeVar("Item", DefenseConfig, AttackConfig)


def _build_items(cls: type[Item], items: list, noun: str) -> list[Item]:
    """``items`` (mappings from YAML, or built already) as ``cls``; an error names the item."""
    built = []
    for index, item in enumerate(items):
        name = item.get("name") if isinstance(item, dict) else getattr(item, "name", None)
        with _naming(f"{noun} {name!r}" if name is not None else f"{noun} #{index + 1}"):
            built.append(item if isinstance(item, cls) else from_dict(cls, item))
    return built


@contextmanager
def _naming(where: str) -> Iterator[None]:
    """Re-raise a configuration error as a ValueError that starts with ``where`` it is."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise ValueError(f"{where}: {message}") from error


def _check_start(attack: AttackConfig, earlier: dict[str, AttackConfig], defenses: list[str],
                 cascade: bool) -> None:
    """A warm start must come from an attack listed before, under the same threat model, that
    runs against every defence this one does; under the cascade, of the same threat group (the
    source is crafted only on the samples its own group left standing)."""
    start = earlier.get(attack.start_from)
    if start is None:
        raise ValueError(f"attack {attack.name!r}: start_from {attack.start_from!r} must name an "
                         f"attack listed before it ({', '.join(earlier) or 'none'})")
    if (start.norm, start.eps) != (attack.norm, attack.eps):
        raise ValueError(f"attack {attack.name!r}: start_from {attack.start_from!r} has another "
                         "threat model (norm and eps must match)")
    if cascade and start.kind != "transfer" and start.frozen_noise != attack.frozen_noise:
        raise ValueError(f"attack {attack.name!r}: under the cascade, start_from {attack.start_from!r} "
                         "must use the same noise (fresh or frozen): it is crafted only on the samples "
                         "its own threat group left standing")
    missing = [d for d in defenses if attack.applies_to(d) and not start.applies_to(d)]
    if missing:
        raise ValueError(f"attack {attack.name!r}: start_from {attack.start_from!r} does not run "
                         f"against {', '.join(missing)}")


def load_experiment(path: str | Path, overrides: dict | None = None) -> ExperimentConfig:
    """Read an experiment YAML, apply ``overrides`` (e.g. from ``--set``), validate it."""
    values = load_yaml(path)
    try:
        return from_dict(ExperimentConfig, merge(values, overrides or {}))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from error
