"""Run a certification experiment: one JSON record per (sample, setting), appended and fsynced
as soon as it exists, resumable at record granularity and shardable by ``torchrun``.

The run directory is ``evaluation.rundir``'s (config.yaml, resolved.json, results.jsonl or
results.rank<N>.jsonl, sessions.jsonl, metadata.json, summary.json). Every record's noise is
seeded from (seed, setting, dataset index) alone, so a resumed, reordered or sharded run writes
the same records as a straight one. Each session's entry in sessions.jsonl also records the
images each setting plans and the image shape (what a report of a stopped run needs). Settings
run in the order the config lists them, so the config's author decides which rows a stopped run
has complete.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..atomic import write_atomically
from ..config import dump_yaml, from_dict, load_yaml
from ..data import LabelledImages
from ..devices import hardware, resolve_device, resolve_precision
from ..evaluation.distributed import Shard, current_shard, finish, shard_device
from ..evaluation.metadata import RunClock, environment
from ..evaluation.records import RecordWriter, read_records
from ..evaluation.resolved import differences, package_version
from ..evaluation.rundir import RunDirectory
from ..evaluation.runner import load_experiment_data
from ..models.classifiers import load_classifier
from ..models.diffusion_loader import load_diffusion
from ..models.noise_predictor import NoisePredictor
from ..seeding import derive_seed
from .config import CertifyConfig, SettingConfig
from .denoisers import DenoisedClassifier, build_base_classifier, noise_level
from .smoothing import SmoothedClassifier
from .summary import summarize_records

#: what a resumed run may change without changing any certificate: its presentation (the
#: description, the run it is paired with, the settings it compares), the attack section (whose records the attack's own
#: settings file guards: ``attack_run``) and the precision as written, so that ``auto`` may
#: become the ``fp32`` it resolved to on another CPU (resolved.json's resolved precision, which
#: the records do depend on, is still checked)
_FREE_FIELDS = ("description", "paired_with", "compare", "attack", "precision")


def sample_seed(config: CertifyConfig, setting: SettingConfig, dataset_index: int) -> int:
    """The seed of every draw of one (sample, setting): independent of order, shard and batch."""
    return derive_seed(config.seed, "certify", setting.name, int(dataset_index))


@dataclass
class OpenRun:
    """A run directory claimed for this config, with what every phase of the run works on."""

    files: RunDirectory
    device: torch.device
    shard: Shard
    data: LabelledImages
    bases: dict[str, DenoisedClassifier]


def open_run(config: CertifyConfig, run_dir: str | Path, phase: str = "certify") -> OpenRun:
    """Load the data and models, check them, claim ``run_dir`` (or check that it holds this same
    run before resuming) and note the session and its ``phase``."""
    files = RunDirectory(run_dir)
    device = shard_device(resolve_device(config.device))
    shard = current_shard(device)
    data = load_experiment_data(config)
    victim, diffusion = load_models(config, device)
    bases = {s.name: build_setting(config, s, victim, diffusion) for s in config.settings}
    _check_compatible(config, data, victim, diffusion, device)
    resolved = resolved_settings(config, bases, diffusion, device)
    if shard.is_main:
        claim_certify_dir(files, config, resolved)
        _append(files.sessions, {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "phase": phase,
                                 "processes": shard.world_size, "hardware": hardware(device, config.precision),
                                 "planned": planned_images(config, len(data)),
                                 "image_shape": list(data.images.shape[1:])})
    shard.barrier()
    return OpenRun(files, device, shard, data, bases)


def run_certification(config: CertifyConfig, run_dir: str | Path, show_progress: bool = True) -> dict:
    """Run (or resume) ``config`` in ``run_dir``; returns the summary (on the main process)."""
    run = open_run(config, run_dir)
    files, device, shard, data, bases = run.files, run.device, run.shard, run.data, run.bases
    clock = RunClock(files.metadata)
    written = {record_key(r): r for r in certify_records(files)}
    check_indices(written.values(), data)
    units = work_units(config, len(data))
    mine = [unit for position, unit in enumerate(units) if position % shard.world_size == shard.rank]
    todo = [(s, i) for s, i in mine if (s.name, i) not in written]
    writer_path = files.results if shard.world_size == 1 else files.shard_results(shard.rank)
    classes = len(data.classes)
    with RecordWriter(writer_path) as writer, tqdm(total=len(mine), initial=len(mine) - len(todo),
                                                   disable=not show_progress, desc=config.name,
                                                   dynamic_ncols=True) as progress:
        for setting, index in todo:
            progress.set_postfix_str(f"{setting.name} #{index}")
            record = certify_sample(config, setting, bases[setting.name], data, index, classes, device)
            writer.write([record])
            if shard.is_main:
                clock.save()
            progress.update(1)
    shard.barrier()
    summary = {}
    if shard.is_main:
        summary = _finish_run(config, files, clock, device, len(data))
    finish(shard)
    return summary


def load_models(config: CertifyConfig, device: torch.device) -> tuple[nn.Module, NoisePredictor | None]:
    """The victim (any name ``load_classifier`` takes) and, if a setting denoises, the diffusion
    model (any name ``load_diffusion`` takes), on ``device``."""
    models = config.models
    victim = load_classifier(models.victim, arch=models.victim_arch, device=device, **models.victim_options)
    victim = victim.eval().requires_grad_(False)
    needs_diffusion = any(s.denoiser != "none" for s in config.settings)
    diffusion = load_diffusion(models.diffusion).to(device) if needs_diffusion else None
    return victim, diffusion


def build_setting(config: CertifyConfig, setting: SettingConfig, victim: nn.Module,
                  diffusion: NoisePredictor | None) -> DenoisedClassifier:
    """The base classifier of ``setting`` (an error names the setting)."""
    try:
        return build_base_classifier(victim, diffusion, setting.denoiser, setting.sigma, steps=setting.steps,
                                     guidance_scale=setting.guidance_scale, votes=setting.votes,
                                     precision=config.precision, dataset=config.data.dataset,
                                     purifier=setting.purifier)
    except (TypeError, ValueError) as error:
        raise ValueError(f"setting {setting.name!r}: {error}") from error


def work_units(config: CertifyConfig, images: int) -> list[tuple[SettingConfig, int]]:
    """Every (setting, image position) to certify: settings in the config's order, then images
    in the data order."""
    return [(s, i) for s in config.settings for i in range(config.images(s, images))]


def certify_sample(config: CertifyConfig, setting: SettingConfig, base: DenoisedClassifier,
                   data: LabelledImages, index: int, num_classes: int, device: torch.device) -> dict:
    """CERTIFY one image under one setting, as its record."""
    dataset_index = int(data.indices[index])
    label = int(data.labels[index])
    smoothed = SmoothedClassifier(base, num_classes, setting.sigma, config.batch_size, device)
    started = time.monotonic()
    result = smoothed.certify(data.images[index].to(device), config.n0, config.draws(setting), config.alpha,
                              sample_seed(config, setting, dataset_index), label=label,
                              skip_wrong=config.skip_wrong,
                              curtail_radii=config.report_radii if config.curtail else None)
    seconds = time.monotonic() - started
    return {"index": index, "dataset_index": dataset_index, "setting": setting.name, "sigma": setting.sigma,
            "label": label, "predicted": result.predicted, "selection_counts": result.selection_counts,
            "n0": result.n0, "n": result.n, "count": result.count, "drawn": result.drawn,
            "estimation_counts": result.estimation_counts,
            "p_lower": result.p_lower, "radius": result.radius, "abstained": result.abstained,
            "skipped": result.skipped, "curtailed": result.curtailed,
            "correct": result.predicted == label and not result.abstained,
            "seconds": round(seconds, 3), "denoiser_calls": result.denoiser_calls}


def is_certification_dir(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a certification run (its config.yaml lists smoothing settings,
    not an evaluation's defences)."""
    files = RunDirectory(run_dir)
    values = load_yaml(files.config) if files.config.is_file() else None
    return isinstance(values, dict) and "settings" in values and "defenses" not in values


def record_key(record: dict) -> tuple[str, int]:
    return (str(record["setting"]), int(record["index"]))


def certify_records(files: RunDirectory) -> list[dict]:
    """Every complete record of the run (merged file and shard files), one per key."""
    records = {}
    for path in [files.results, *files.shard_result_files()]:
        for record in read_records(path):
            records[record_key(record)] = record
    return list(records.values())


def resolved_settings(config: CertifyConfig, bases: dict[str, DenoisedClassifier],
                      diffusion: NoisePredictor | None, device: torch.device) -> dict:
    """What the run really runs: per setting its noise level on the diffusion model's time axis,
    the purifier settings after defaults, and the denoiser calls per draw; the statistics; the
    resolved precision and the package version (a resume refuses a change of any of them)."""
    settings = {}
    for spec in config.settings:
        base = bases[spec.name]
        purifier = getattr(base.denoiser, "purifier", None)
        level = noise_level(diffusion, spec.sigma) if diffusion is not None and spec.denoiser != "none" else None
        settings[spec.name] = {
            "denoiser": spec.denoiser, "sigma": spec.sigma, "n": config.draws(spec), "votes": base.votes,
            "noise_level": None if level is None else {**asdict(level), "model_noise": level.model_noise},
            "purifier": asdict(purifier.config) if purifier is not None else None,
            "denoiser_calls_per_draw": base.denoiser_calls}
    return {"distpure": package_version(), "settings": {
        "settings": settings, "n0": config.n0, "alpha": config.alpha, "batch_size": config.batch_size,
        "skip_wrong": config.skip_wrong, "curtail": config.curtail, "radii": list(config.report_radii),
        "seed": config.seed, "resolved_precision": resolve_precision(config.precision, device)}}


def record_shaping(resolved: dict) -> dict:
    """resolved.json's ``settings`` section as the records depend on it: each purifier entry
    without the precision its config was written with (``auto`` or ``fp32``), which the section's
    ``resolved_precision`` stands for."""
    settings = {name: {**spec, "purifier": None if spec.get("purifier") is None
                       else {k: v for k, v in spec["purifier"].items() if k != "precision"}}
                for name, spec in resolved["settings"].items()}
    return {**resolved, "settings": settings}


def claim_certify_dir(files: RunDirectory, config: CertifyConfig, resolved: dict) -> None:
    """Create the run directory, or check before resuming that it holds this same run: the
    config as written (image limits and the description may change, and settings may be added:
    no record depends on them) and as resolved, with the same distpure version; else refuse,
    naming what differs."""
    files.root.mkdir(parents=True, exist_ok=True)
    if files.config.is_file():
        try:
            stored = from_dict(CertifyConfig, load_yaml(files.config))
        except ValueError as error:
            raise ValueError(f"{files.root} holds a certification run this version cannot read ({error}); "
                             "use another --out directory") from error
        before, now = _record_fields(stored), _record_fields(config)
        now["settings"] = {k: v for k, v in now["settings"].items() if k in before["settings"]}  # appended: new
        changed = differences(before, now)
        if changed:
            raise ValueError(f"{files.root} holds a different certification run ({'; '.join(changed[:8])}); "
                             "use another --out directory or delete it")
    if files.resolved.is_file():
        stored = json.loads(files.resolved.read_text())
        current = dict(resolved["settings"])
        current["settings"] = {k: v for k, v in current["settings"].items() if k in stored["settings"]["settings"]}
        changed = differences({"distpure": stored.get("distpure"), **record_shaping(stored["settings"])},
                              {"distpure": resolved["distpure"], **record_shaping(current)})
        if changed:
            raise ValueError(f"{files.root} was run with other resolved settings or another distpure "
                             f"version ({'; '.join(changed[:8])}); resuming would mix two runs in one "
                             "results file: finish it with the version and precision that started it, "
                             "or use another --out directory")
    files.config.write_text(dump_yaml(asdict(config)))
    files.resolved.write_text(json.dumps(resolved, indent=2, sort_keys=True))


def _record_fields(config: CertifyConfig) -> dict:
    """The settings that shape a record (not how many images get one, nor the description)."""
    values = asdict(config)
    for name in _FREE_FIELDS:
        values.pop(name)
    values["data"] = {k: v for k, v in values["data"].items() if k != "limit"}
    values["settings"] = {s["name"]: {k: v for k, v in s.items() if k != "limit"} for s in values["settings"]}
    return values


def check_indices(records, data: LabelledImages) -> None:
    """Refuse to resume records whose image is no longer at their position in the data order."""
    for record in records:
        position = int(record["index"])
        if position >= len(data) or int(data.indices[position]) != int(record["dataset_index"]):
            raise ValueError(f"record {record['setting']} #{position} names dataset image "
                             f"{record['dataset_index']}, which the data no longer holds there; "
                             "use another --out directory")


def _check_compatible(config: CertifyConfig, data: LabelledImages, victim: nn.Module,
                      diffusion: NoisePredictor | None, device: torch.device) -> None:
    """Before any work: the victim has one output per class; the diffusion model works at the
    data's shape."""
    if len(data) == 0:
        raise ValueError(f"the {config.data.dataset} data holds no images")
    sample = data.images[:1].to(device)
    if diffusion is not None and tuple(sample.shape[1:]) != (
            diffusion.image_channels, diffusion.sample_size, diffusion.sample_size):
        raise ValueError(f"diffusion model {config.models.diffusion!r} works on {diffusion.image_channels} x "
                         f"{diffusion.sample_size}x{diffusion.sample_size} images, the data's are "
                         f"{tuple(sample.shape[1:])}")
    with torch.no_grad():
        outputs = victim(sample).shape[-1]
    if outputs != len(data.classes):
        raise ValueError(f"victim {config.models.victim!r} has {outputs} outputs but the data has "
                         f"{len(data.classes)} classes")


def planned_images(config: CertifyConfig, available: int) -> dict[str, int]:
    return {s.name: config.images(s, available) for s in config.settings}


def summarize_run(config: CertifyConfig, files: RunDirectory, available: int | None = None) -> dict:
    """The summary of whatever records ``files`` holds (a finished or a stopped run)."""
    planned = planned_images(config, available) if available is not None else None
    return summarize_records(certify_records(files), [s.name for s in config.settings],
                             config.report_radii, planned)


def _finish_run(config: CertifyConfig, files: RunDirectory, clock: RunClock, device: torch.device,
                available: int) -> dict:
    """Merge the shard files into results.jsonl (sorted by setting and image), write the
    summary and the metadata."""
    records = sorted(certify_records(files), key=record_key)
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    write_atomically(files.results, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    for shard_file in files.shard_result_files():
        shard_file.unlink()
    summary = {"settings": summarize_run(config, files, available), "radii": list(config.report_radii),
               "hardware": hardware(device, config.precision)}
    write_atomically(files.summary, lambda tmp: tmp.write_text(json.dumps(summary, indent=2, sort_keys=True)))
    clock.save()
    metadata = json.loads(files.metadata.read_text()) if files.metadata.is_file() else {}
    metadata.update(environment(device, config.precision))
    write_atomically(files.metadata, lambda tmp: tmp.write_text(json.dumps(metadata, indent=2, sort_keys=True)))
    return summary


def _append(path: Path, record: dict) -> None:
    with RecordWriter(path) as writer:
        writer.write([record])
