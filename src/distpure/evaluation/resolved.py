"""What a run really ran: every defence's settings after defaults and overrides, stored beside
its config, so that a resumed run never mixes two defences in one results file (a default may
change between versions; ``config.yaml`` stores only what the user wrote)."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, is_dataclass
from importlib import metadata as importlib_metadata


from ..config import dump_yaml, from_dict
from ..defenses.defended import DefendedClassifier
from ..defenses.purifier import PurifierConfig
from .config import PRESENTATION_FIELDS, EvaluationConfig, ExperimentConfig, load_experiment
from .rundir import RunDirectory, evaluation_sessions

_LOG = logging.getLogger("distpure")


def package_version() -> str:
    try:
        return importlib_metadata.version("distpure")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def resolved_settings(config: ExperimentConfig, defenses: dict[str, DefendedClassifier]) -> dict:
    """The full settings of every defence as built (purifier settings after the recommended
    defaults and the config's overrides), the attacks' defaulted iterations and EOT, and the
    scoring, with the package version that resolved them and each defence's cost (denoiser
    calls per image); the version and the cost are recorded, not compared (a new version that
    resolves the same settings may resume a run)."""
    settings = {}
    for spec in config.defenses:
        defense = defenses[spec.name]
        purifier = defense.purifier
        purifier_config = getattr(purifier, "config", None)
        settings[spec.name] = {
            "kind": spec.kind, "votes": defense.votes, "stochastic": defense.stochastic,
            "purifier": asdict(purifier_config) if is_dataclass(purifier_config) else None,
            "preprocessing": spec.preprocessing or None,
            "classifier": spec.classifier if spec.kind == "classifier" else config.models.victim,
            "diffusion": config.diffusion_for(spec) if spec.kind == "purifier" else None}
    attacks = {a.name: {"iterations": a.iterations, "eot_draws": a.eot_draws} for a in config.attacks}
    cost = {spec.name: {"denoiser_calls": defenses[spec.name].denoiser_calls} for spec in config.defenses}
    return {"distpure": package_version(), "cost": cost, "settings": {
        "defenses": settings, "attacks": attacks, "evaluation": asdict(config.evaluation),
        "diffusion": config.models.diffusion}}


def differences(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """``a.b: 1 -> 2`` for every setting that differs between two nested mappings."""
    lines = []
    for key in sorted(set(stored) | set(current), key=str):
        old, new = stored.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(old, dict) and isinstance(new, dict):
            lines += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            lines.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return lines


def _through_dataclasses(settings: dict) -> dict:
    """Stored resolved settings with the scoring and purifier settings read through today's
    dataclasses, as ``config.yaml`` is: a setting added since (at its default, which keeps the
    old behaviour) is no change, while a changed default of an existing setting still shows.
    A run from before per-defence diffusion models ran every purifier on the experiment's."""
    settings = dict(settings)
    if "evaluation" in settings:
        settings["evaluation"] = asdict(from_dict(EvaluationConfig, settings["evaluation"]))
    settings["defenses"] = {
        name: {"diffusion": settings.get("diffusion") if spec.get("purifier") is not None else None,
               **spec, "purifier": asdict(from_dict(PurifierConfig, spec["purifier"]))
               if spec.get("purifier") is not None else None}
        for name, spec in settings.get("defenses", {}).items()}
    return settings


def stored_experiment(files: RunDirectory) -> ExperimentConfig:
    """The experiment a run directory holds (``config.yaml``), read through today's dataclasses."""
    try:
        return load_experiment(files.config)
    except ValueError as error:
        raise ValueError(f"{files.root} holds an experiment this version cannot read ({error}); "
                         "finish it with the version that started it, or use another --out directory") from error


def appended(stored: dict, current: dict, field: str) -> list[str]:
    """The names of the ``field`` entries (``attacks`` or ``defenses``) that ``current`` (an
    experiment as a dict) adds after the end of ``stored``'s list, everything before them
    unchanged: a run may grow so, since neither the cascade nor a warm start ever lets a later
    attack change an earlier attack's records, and a defence's records depend on no other's."""
    old, new = stored[field], current[field]
    return [entry["name"] for entry in new[len(old):]] if new[:len(old)] == old else []


def _without_defenses(attacks: list[dict], names: list[str]) -> list[dict]:
    """``attacks`` with ``names`` struck from their ``defenses`` lists: an appended defence may
    join an attack restricted to some defences without changing that attack for the others."""
    return [{**attack, "defenses": [d for d in attack["defenses"] if d not in names]}
            if attack.get("defenses") is not None else attack for attack in attacks]


def _omit(settings: dict, names: list[str]) -> dict:
    """``settings`` (by name) without ``names``: what a grown run stored before it grew."""
    return {name: value for name, value in settings.items() if name not in names}


def more_images(stored: dict, current: dict) -> bool:
    """Whether ``current`` (an experiment as a dict) evaluates more images than ``stored`` and
    nothing else about its data: a run may grow so when its images filled whole batches, since
    the seeded order puts the same images first and the new ones form new batches."""
    old, new = stored["data"], current["data"]
    limit, grown = old.get("limit"), new.get("limit")
    return (limit is not None and (grown is None or grown > limit) and limit % stored["batch_size"] == 0
            and {**new, "limit": limit} == old)


def _recorded_settings(experiment: dict) -> dict:
    """An experiment (as a dict) without what only changes its presentation."""
    return {key: value for key, value in experiment.items() if key not in PRESENTATION_FIELDS}


def claim_run_dir(files: RunDirectory, config: ExperimentConfig, resolved: dict) -> None:
    """Create the run directory, or check before resuming that it holds this same experiment,
    as written (``config.yaml``) and as resolved (``resolved.json``), or the same with defences
    or attacks appended, or more images (whole batches; each logged), or its presentation
    changed; any other difference is refused, named."""
    files.root.mkdir(parents=True, exist_ok=True)
    new_attacks: list[str] = []
    new_defenses: list[str] = []
    if files.config.is_file():  # read through today's dataclasses: a new setting's default is no change
        stored, current = (_recorded_settings(asdict(c)) for c in (stored_experiment(files), config))
        new_defenses = appended(stored, current, "defenses")
        current = {**current, "attacks": _without_defenses(current["attacks"], new_defenses)}
        new_attacks = appended(stored, current, "attacks")
        grown = more_images(stored, current)
        changed = "; ".join(differences(stored, {**current, **({"attacks": stored["attacks"]} if new_attacks else {}),
                                                 **({"defenses": stored["defenses"]} if new_defenses else {}),
                                                 **({"data": stored["data"]} if grown else {})})[:8])
        if changed:
            raise ValueError(f"{files.root} holds a different experiment (its config.yaml differs: "
                             f"{changed}); use another --out directory or delete it, append new "
                             "defences or attacks after the stored ones, or raise data.limit (from "
                             "a whole number of batches)")
        for field, names in (("defences", new_defenses), ("attacks", new_attacks)):
            if names:
                _LOG.info("extending %s with %s %s", files.root, field, ", ".join(names))
        if grown:
            _LOG.info("extending %s from %d to %s images", files.root, stored["data"]["limit"],
                      current["data"]["limit"] or "all")
        if new_defenses or new_attacks or grown:  # a finished run is unfinished until the new records exist
            files.summary.unlink(missing_ok=True)
    settings = resolved["settings"]
    changed = resolved_changes(files, {**settings, "attacks": _omit(settings["attacks"], new_attacks),
                                       "defenses": _omit(settings["defenses"], new_defenses)})
    if changed:
        raise ValueError(f"{files.root} was run with other settings than this version resolves "
                         f"({'; '.join(changed[:8])}); resuming would mix two defences in one "
                         "results file: finish it with the version that started it, or use "
                         "another --out directory")
    files.config.write_text(dump_yaml(asdict(config)))
    files.resolved.write_text(json.dumps(resolved, indent=2, sort_keys=True))


def resolved_changes(files: RunDirectory, settings: dict) -> list[str]:
    """How ``settings`` (``resolved_settings(...)["settings"]``) differ from those the run stored in
    ``resolved.json``, read through today's dataclasses (none where it stored none)."""
    if not files.resolved.is_file():
        return []
    return differences(_through_dataclasses(json.loads(files.resolved.read_text())["settings"]), settings)


#: what makes records comparable across sessions: the code that scored them and its precision
STAMP_FIELDS = ("distpure", "precision")


def run_stamp(resolved_precision: str) -> dict:
    """The stamp every record of this session carries: package version and resolved precision."""
    return {"distpure": package_version(), "precision": resolved_precision}


def record_stamp(record: dict, legacy: dict) -> tuple[str, str]:
    """A record's (version, precision); records from before stamps carry the run's ``legacy`` one."""
    return tuple(str(record.get(field, legacy.get(field))) for field in STAMP_FIELDS)


def legacy_stamp(files: RunDirectory) -> dict:
    """The stamp of records written before records carried one: the version in ``resolved.json``
    and the resolved precision of the run's last ``evaluate`` session."""
    version = json.loads(files.resolved.read_text()).get("distpure") if files.resolved.is_file() else None
    sessions = evaluation_sessions(files.read_sessions())
    precision = sessions[-1].get("hardware", {}).get("resolved_precision") if sessions else None
    return {"distpure": version, "precision": precision}


def check_stamps(files: RunDirectory, records: list[dict], stamp: dict, new_resumption: bool) -> None:
    """Refuse to resume records made by another package version or at another resolved precision
    (their draws and attacks would not be the ones this session makes), naming the difference;
    with ``new_resumption`` the session goes on, its records stamped apart for the report."""
    legacy = legacy_stamp(files)
    current = tuple(str(stamp[field]) for field in STAMP_FIELDS)
    others = sorted({record_stamp(r, legacy) for r in records} - {current})
    if others and not new_resumption:
        found = "; ".join(f"distpure {version} at {precision}" for version, precision in others)
        raise ValueError(f"{files.root} holds records made by {found}, but this session is distpure "
                         f"{current[0]} at {current[1]}: resume it with that version and precision, "
                         "or pass --new-resumption to go on with this session's records kept apart in the report")
    if others:
        _LOG.warning("resuming %s as a new resumption (distpure %s at %s)", files.root, *current)
