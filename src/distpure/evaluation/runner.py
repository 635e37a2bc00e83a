"""Run an experiment: every (sample, defence, attack) record appended as soon as it exists.

The files of a run directory are defined in ``rundir``; who scores with which noise in
``protocol``. Each batch is attacked once per (defence, attack) and every example scored by
the experiment's R draws.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..attacks.suite import AttackConfig, Crafted, craft
from ..data import LabelledImages, default_data_root, load_dataset
from ..defenses.defended import DefendedClassifier
from ..defenses.recommended import build_purified_classifier
from ..devices import hardware, resolve_device
from ..models.classifiers import load_classifier
from ..models.diffusion import load_diffusion
from ..models.weights import save_tensors
from .config import DefenseConfig, ExperimentConfig
from .distributed import Shard, current_shard, finish, shard_device
from .metadata import RunClock, environment
from ..seeding import derive_seed
from .protocol import predict_draws, scorers
from .records import RecordWriter, check_dataset_indices, record_key, write_sorted
from .resolved import claim_run_dir, resolved_settings
from .rundir import RunDirectory
from .summary import summarize

EXAMPLES_PER_PAIR = 8
_LOG = logging.getLogger("distpure")
DEFAULT_DATA_FOLDERS = {"cifar10": "cifar10-jpeg", "imagenet30": "imagenet30-samples"}


def run_experiment(config: ExperimentConfig, run_dir: str | Path, show_progress: bool = True) -> dict:
    """Run (or resume) ``config`` in ``run_dir`` and return its summary."""
    files = RunDirectory(run_dir)
    device = shard_device(resolve_device(config.device))
    shard = current_shard(device)
    data = load_experiment_data(config)
    defenses = build_defenses(config, device)
    check_compatible(config, data, defenses, device)
    if shard.is_main:
        claim_run_dir(files, config, resolved_settings(config, defenses))
        _append_jsonl(files.sessions, {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                       "processes": shard.world_size, "hardware": hardware(device, config.precision)})
    shard.barrier()
    clock = RunClock(files.metadata)
    existing = files.records()
    check_dataset_indices(existing, data.indices.tolist())
    done = {record_key(r) for r in existing}
    batches = list(enumerate(range(0, len(data), config.batch_size)))
    work = [(b, start) for b, start in batches if shard.owns(b)]
    writer_path = files.results if shard.world_size == 1 else files.shard_results(shard.rank)
    pairs = [(d, a) for d in config.defenses for a in config.attacks]
    with RecordWriter(writer_path) as writer, tqdm(total=len(work) * len(pairs), disable=not show_progress,
                                                   desc=config.name, dynamic_ncols=True) as progress:
        for batch_index, start in work:
            indices = list(range(start, min(start + config.batch_size, len(data))))
            crafted: dict[tuple[str, str], Crafted] = {}
            for defense_config, attack in pairs:
                keys = [(i, defense_config.name, attack.name) for i in indices]
                if not all(key in done for key in keys):
                    batch = _Batch(config, data, indices, batch_index, device, files)
                    writer.write(_evaluate_batch(batch, defenses[defense_config.name], defense_config,
                                                 attack, crafted))
                progress.update(1)
            if shard.is_main:
                clock.save()
    shard.barrier()
    summary = _finalize(config, files, shard, clock, device) if shard.is_main else {}
    finish(shard)
    return summary


def load_experiment_data(config: ExperimentConfig) -> LabelledImages:
    """The evaluation images: a seeded subset of ``limit`` samples of the configured dataset, in
    seeded random order (so the records of a run stopped early are a fair sample)."""
    data_config = config.data
    root = data_config.root or default_data_root() / DEFAULT_DATA_FOLDERS.get(data_config.dataset, "")
    return load_dataset(data_config.dataset, root, data_config.split, data_config.limit, data_config.seed)


def check_compatible(config: ExperimentConfig, data: LabelledImages,
                     defenses: dict[str, DefendedClassifier], device: torch.device) -> None:
    """Before any work: every classifier has one output per class of the data, and every
    diffusion model works at the data's channels and resolution (the error names both)."""
    if len(data) == 0:
        raise ValueError(f"the {config.data.dataset} data holds no images (data.limit = {config.data.limit})")
    sample = data.images[:1].to(device)
    classes = max(len(data.classes), int(data.labels.max()) + 1)
    for spec in config.defenses:
        defense = defenses[spec.name]
        diffusion = getattr(defense.purifier, "diffusion", None)
        if diffusion is not None and tuple(sample.shape[1:]) != (
                diffusion.image_channels, diffusion.sample_size, diffusion.sample_size):
            raise ValueError(f"defence {spec.name!r}: diffusion model {config.models.diffusion!r} works on "
                             f"{diffusion.image_channels} x {diffusion.sample_size}x{diffusion.sample_size} "
                             f"images but the {config.data.dataset} images are "
                             f"{sample.shape[1]} x {sample.shape[2]}x{sample.shape[3]}")
        with torch.no_grad():
            outputs = defense.victim(sample).shape[-1]
        if outputs != classes:
            name = spec.classifier if spec.kind == "classifier" else config.models.victim
            raise ValueError(f"defence {spec.name!r}: classifier {name!r} has {outputs} outputs but the "
                             f"{config.data.dataset} data has {classes} classes")


def build_defenses(config: ExperimentConfig, device: torch.device) -> dict[str, DefendedClassifier]:
    """Every configured defence, sharing one victim and one diffusion model."""
    victim = load_classifier(config.models.victim, arch=config.models.victim_arch, device=device,
                             **config.models.victim_options)
    needs_diffusion = any(d.kind == "purifier" for d in config.defenses)
    diffusion = load_diffusion(config.models.diffusion).to(device) if needs_diffusion else None
    return {d.name: _build_defense(d, config, victim, diffusion, device) for d in config.defenses}


def _build_defense(spec: DefenseConfig, config: ExperimentConfig, victim, diffusion, device) -> DefendedClassifier:
    if spec.kind == "none":
        return DefendedClassifier(victim, None)
    if spec.kind == "classifier":
        robust = load_classifier(spec.classifier, arch=spec.classifier_arch, device=device,
                                 **spec.classifier_options)
        return DefendedClassifier(robust, None)
    if spec.kind == "preprocessing":
        return DefendedClassifier(victim, spec.build_preprocessing(), spec.votes)
    return build_purified_classifier(victim, diffusion, config.purifier_config(spec), spec.votes)


@dataclass
class _Batch:
    """One batch of the evaluation: where its images are and what the run is."""

    config: ExperimentConfig
    data: LabelledImages
    indices: list[int]
    number: int
    device: torch.device
    files: RunDirectory

    @property
    def images(self) -> torch.Tensor:
        return self.data.images[self.indices].to(self.device)

    @property
    def labels(self) -> torch.Tensor:
        return self.data.labels[self.indices].to(self.device)

    @property
    def dataset_indices(self) -> list[int]:
        return [int(self.data.indices[i]) for i in self.indices]


def _evaluate_batch(batch: _Batch, defense: DefendedClassifier, spec: DefenseConfig,
                    attack: AttackConfig, crafted: dict[tuple[str, str], Crafted]) -> list[dict]:
    """Attack one batch, then classify every example with the experiment's R scoring draws
    (or the attacker's frozen draw), one record per sample."""
    config, labels = batch.config, batch.labels
    result = _adversarial_examples(batch, defense, spec, attack, crafted)
    seed = derive_seed(config.seed, spec.name, attack.name, batch.number)
    models = scorers(defense, config.evaluation.draws, seed, result.frozen_scorer)
    predictions = predict_draws(models, result.examples)
    if result.warnings:
        _append_warnings(batch.files, spec.name, attack.name, batch.number, result.warnings)
    if batch.number == 0:
        _save_examples(batch.files, spec.name, attack.name, batch.images, result.examples, models[0])
    broken = result.broken.tolist() if result.broken is not None else [False] * len(labels)
    return [{"index": i, "dataset_index": key, "defense": spec.name, "attack": attack.name,
             "label": int(y), "predictions": draws, **({"verdict": "broken"} if lost else {})}
            for i, key, y, draws, lost in zip(batch.indices, batch.dataset_indices, labels.tolist(),
                                              predictions, broken)]


def _adversarial_examples(batch: _Batch, defense: DefendedClassifier, spec: DefenseConfig,
                          attack: AttackConfig, crafted: dict[tuple[str, str], Crafted]) -> Crafted:
    """One batch's examples for ``attack``, crafted once per batch and reused as a warm start,
    and, for transfer attacks, across every defence whose examples come from the same model
    (the key names that model). Seeds depend only on names and the batch, so recrafting after a
    resume gives the same examples."""
    config = batch.config
    owner = f"victim={_victim_name(spec, config)}" if attack.kind == "transfer" else spec.name
    if (owner, attack.name) not in crafted:
        start = None
        if attack.start_from is not None:
            source = next(a for a in config.attacks if a.name == attack.start_from)
            start = _adversarial_examples(batch, defense, spec, source, crafted).examples
        seed = derive_seed(config.seed, owner, attack.name, batch.number)
        frozen_seed = derive_seed(config.seed, spec.name, "frozen-noise")  # one draw per defence
        result = craft(attack, defense, batch.images, batch.labels, seed, start, batch.dataset_indices,
                       frozen_seed)
        result.examples = result.examples.detach()
        if result.trace:
            _append_jsonl(batch.files.traces, {"owner": owner, "attack": attack.name, "batch": batch.number,
                                               "n": len(batch.indices), "trace": result.trace})
        crafted[owner, attack.name] = result
    return crafted[owner, attack.name]


def _victim_name(spec: DefenseConfig, config: ExperimentConfig) -> str:
    """The classifier a defence puts behind its purification (its own, or the experiment's),
    named fully: the same name with another architecture or options is another model."""
    if spec.kind == "classifier":
        name, arch, options = spec.classifier, spec.classifier_arch, spec.classifier_options
    else:
        name, arch, options = config.models.victim, config.models.victim_arch, config.models.victim_options
    return name + (f" [{arch}]" if arch else "") + (f" {json.dumps(options, sort_keys=True)}" if options else "")


def _append_warnings(files: RunDirectory, defense: str, attack: str, batch: int, messages: list[str]) -> None:
    """Log what an attack warned about and keep it for the report."""
    for message in messages:
        _LOG.warning("defence %s, attack %s, batch %d: %s", defense, attack, batch, message)
        _append_jsonl(files.warnings, {"defense": defense, "attack": attack, "batch": batch, "message": message})


def _append_jsonl(path: Path, record: dict) -> None:
    """One JSON line appended in a single write (atomic for a line: shards may share the file)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")


def _save_examples(files: RunDirectory, defense: str, attack: str, images, adversarial, scorer) -> None:
    """A few clean / adversarial / purified images for the report's grid."""
    clean, adv = images[:EXAMPLES_PER_PAIR], adversarial[:EXAMPLES_PER_PAIR]
    with torch.no_grad():
        purified = scorer.purifier(adv) if scorer.purifier is not None else adv
    save_tensors({"clean": clean, "adversarial": adv, "purified": purified},
                 files.example_file(defense, attack))


def _finalize(config: ExperimentConfig, files: RunDirectory, shard: Shard, clock: RunClock,
              device: torch.device) -> dict:
    """Merge shard files into one canonical results file; write metadata and summary."""
    records = files.records()
    write_sorted(records, files.results)
    for part in files.shard_result_files():
        part.unlink()
    metadata = {"experiment": config.name, "seed": config.seed, "processes": shard.world_size,
                "wall_time_seconds": round(clock.seconds(), 1), **environment(device, config.precision)}
    summary = {**summarize(records, config), "hardware": metadata["hardware"]}
    files.metadata.write_text(json.dumps(metadata, indent=2))
    files.summary.write_text(json.dumps(summary, indent=2))
    return summary
