"""A certification experiment: data, models, the smoothing settings, as dataclasses read from
YAML and validated when read (an error names the setting and its value)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..attacks.base import parse_epsilon
from ..attacks.smoothadv import SmoothAdvConfig
from ..config import from_dict, load_yaml, merge
from ..devices import check_precision
from ..evaluation.config import DataConfig, ModelsConfig
from ..validation import check_choice, check_positive, check_whole
from .denoisers import DENOISER_KINDS
from .statistics import max_certifiable_radius

#: the paper's L2 threat radius (pixel units in [0, 1]), where certified meets empirical accuracy
PAPER_L2_RADIUS = "128/255"
#: the radii every summary reports (L2, pixel units in [0, 1])
REPORT_RADII: tuple[str | float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, PAPER_L2_RADIUS)


@dataclass
class SettingConfig:
    """One smoothed classifier: the ``denoiser`` kind (see ``denoisers``) at smoothing noise
    ``sigma`` (pixel units in [0, 1]) with ``n`` estimation draws (default: the experiment's);
    ``steps`` reverse steps (multistep, guided, voted), ``guidance_scale`` (guided), ``votes``
    (voted), ``purifier`` overrides of the recommended purifier settings (e.g. ``eta``), and
    ``limit``: certify only the first ``limit`` images of the data for this setting; ``reach``:
    the largest radius this setting is meant to certify (default: the largest reported radius),
    which its ``n`` must be able to certify at its σ (a small σ cannot certify a large radius
    with any n this machine can draw, so a small-σ setting states its smaller reach)."""

    name: str
    denoiser: str = "one-shot"
    sigma: float = 0.25
    n: int | None = None
    steps: int = 4
    guidance_scale: float | None = None
    votes: int = 1
    limit: int | None = None
    reach: float | str | None = None
    purifier: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("denoiser kind", self.denoiser, DENOISER_KINDS)
        check_positive("sigma", self.sigma)
        if self.n is not None:
            check_whole("n", self.n, 1)
        check_whole("steps", self.steps, 1)
        check_whole("votes", self.votes, 1)
        if self.votes > 1 and self.denoiser != "voted":
            raise ValueError(f"votes is {self.votes}, but only denoiser 'voted' votes, not {self.denoiser!r}")
        if self.limit is not None:
            check_whole("limit", self.limit, 1)
        if self.guidance_scale is not None and self.denoiser != "guided":
            raise ValueError(f"guidance_scale is set, but only denoiser 'guided' uses it, not {self.denoiser!r}")


#: PREDICT draws an attack's example needs at least: fewer abstain so often that a violation
#: (a certified sample classified otherwise) could hardly be seen
LEAST_PREDICT_DRAWS = 1000


@dataclass
class AttackSection(SmoothAdvConfig):
    """The optional ``attack`` of a certification run (``distpure certify CONFIG --attack``):
    SmoothAdv (see ``attacks.smoothadv``) on the smoothed classifier of ``setting`` at L2
    radius ``epsilon``, on the first ``limit`` images that setting has certified (default: all
    of them); each example is scored by PREDICT with ``n`` fresh draws (at least 1000) at the
    run's ``alpha``. The attack's draws, ``m`` per step, are ``batch_size`` per call as well."""

    setting: str = ""
    n: int = LEAST_PREDICT_DRAWS
    limit: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_whole("n", self.n, LEAST_PREDICT_DRAWS)
        if self.limit is not None:
            check_whole("limit", self.limit, 1)


@dataclass
class CertifyConfig:
    """A certification run: every setting certifies the first images of ``data`` (its own
    ``limit`` at most) with ``n0`` selection draws, ``n`` estimation draws at level ``alpha``,
    ``batch_size`` draws per base-classifier call. ``radii`` are the reported radii (fractions
    such as ``128/255`` allowed; 0 is always reported). ``skip_wrong``: no estimation draws for
    a sample whose selection picked a wrong class (it can never be certified-correct).
    ``curtail``: stop drawing once the outcome at every reported radius is decided (exact at
    those radii; radii in between get a lower bound). ``attack``: the optional SmoothAdv section
    (``AttackSection``), whose records live beside the certificates and never change them.
    ``paired_with``: another certification run's directory whose settings resolved as this run's
    are compared with them image by image in the report (e.g. the off-the-shelf victim's run
    beside a fine-tuned one's); ``compare``: pairs ``[setting, reference]`` of this run compared
    image by image in the report (e.g. guided against unguided). Neither changes a record."""

    name: str = "certify"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    settings: list[SettingConfig] = field(default_factory=list)
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    batch_size: int = 256
    radii: list[float | str] = field(default_factory=lambda: list(REPORT_RADII))
    skip_wrong: bool = True
    curtail: bool = False
    attack: AttackSection | dict | None = None
    paired_with: str | None = None
    compare: list[list[str]] = field(default_factory=list)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if not (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and 0 < self.alpha < 1):
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha!r}")
        for name in ("n0", "n", "batch_size"):
            check_whole(name, getattr(self, name), 1)
        for flag in ("skip_wrong", "curtail"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        try:
            radii = [parse_epsilon(r) for r in self.radii]
        except (ValueError, ZeroDivisionError) as error:
            raise ValueError(f"radii must be numbers or fractions such as 128/255, got {self.radii!r}") from error
        if any(not (r >= 0 and math.isfinite(r)) for r in radii):
            raise ValueError(f"radii must be at least 0, got {self.radii!r}")
        self.settings = [s if isinstance(s, SettingConfig) else _named(s) for s in self.settings]
        if not self.settings:
            raise ValueError("a certification run needs at least one setting")
        names = [s.name for s in self.settings]
        if len(set(names)) != len(names):
            raise ValueError(f"setting names must be unique, got {names}")
        largest = max(radii, default=0.0)
        for setting in self.settings:
            try:
                wanted = largest if setting.reach is None else parse_epsilon(setting.reach)
            except (ValueError, ZeroDivisionError) as error:
                raise ValueError(f"setting {setting.name!r}: reach must be a number or a fraction such as "
                                 f"128/255, got {setting.reach!r}") from error
            n = self.draws(setting)
            reach = max_certifiable_radius(n, self.alpha, setting.sigma)
            if reach < wanted:
                raise ValueError(
                    f"setting {setting.name!r}: n = {n} draws can never certify radius {wanted:.4g} at sigma "
                    f"{setting.sigma} and alpha {self.alpha} (all {n} right gives radius {reach:.4g}); raise n, "
                    "or set the setting's reach to what it is meant to certify")
        if self.attack is not None:
            self.attack = self._attack_section(self.attack)
        for pair in self.compare:
            if not (isinstance(pair, list) and len(pair) == 2 and pair[0] != pair[1] and set(pair) <= set(names)):
                raise ValueError(f"compare: each entry must be [setting, reference], two different settings of "
                                 f"this run ({', '.join(names)}), got {pair!r}")
        if self.paired_with is not None and not (isinstance(self.paired_with, str) and self.paired_with.strip()):
            raise ValueError(f"paired_with must name a certification run directory, got {self.paired_with!r}")

    def _attack_section(self, values: AttackSection | dict) -> AttackSection:
        """The attack section, read and checked (an error says it is the attack's)."""
        try:
            attack = values if isinstance(values, AttackSection) else from_dict(AttackSection, values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"attack: {error}") from error
        names = [s.name for s in self.settings]
        if attack.setting not in names:
            raise ValueError(f"attack: setting {attack.setting!r} is not a setting of this run; "
                             f"expected one of {', '.join(names)}")
        return attack

    def setting(self, name: str) -> SettingConfig:
        """The setting called ``name``."""
        return next(s for s in self.settings if s.name == name)

    @property
    def report_radii(self) -> tuple[float, ...]:
        """The reported radii as floats, 0 first, sorted, without repeats."""
        return tuple(sorted({0.0, *(parse_epsilon(r) for r in self.radii)}))

    def draws(self, setting: SettingConfig) -> int:
        """The estimation draws of ``setting``: its own ``n``, else the experiment's."""
        return setting.n if setting.n is not None else self.n

    def images(self, setting: SettingConfig, available: int) -> int:
        """How many of the ``available`` images ``setting`` certifies."""
        return available if setting.limit is None else min(setting.limit, available)


def _named(values: object) -> SettingConfig:
    name = values.get("name") if isinstance(values, dict) else None
    try:
        return from_dict(SettingConfig, values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"setting {name!r}: {error}") from error


def load_certify_config(path: str | Path, overrides: dict | None = None) -> CertifyConfig:
    """Read a certification YAML, apply ``overrides`` (``--set``), validate it."""
    try:
        return from_dict(CertifyConfig, merge(load_yaml(path), overrides or {}))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from error
