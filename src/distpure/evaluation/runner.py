"""Run an experiment: every (sample, defence, attack) record appended as soon as it exists.

A run directory holds ``config.yaml``, ``results.jsonl`` (records; resumable), ``metadata.json``,
``summary.json`` and ``examples/`` (a few clean / adversarial / purified images for the report).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from ..attacks.suite import AttackConfig, craft, evaluation_model
from ..data import LabelledImages, default_data_root, load_dataset
from ..defenses.defended import DefendedClassifier
from ..defenses.recommended import build_purified_classifier, recommended_purifier_config
from ..devices import resolve_device
from ..models.classifiers import load_classifier
from ..models.diffusion import load_diffusion
from ..models.weights import save_tensors
from .config import DefenseConfig, ExperimentConfig
from .distributed import Shard, current_shard, finish, shard_device
from .metadata import RunClock, environment
from .records import RecordWriter, read_records, record_key, write_sorted
from .summary import summarize

RESULTS = "results.jsonl"
EXAMPLES_PER_PAIR = 8
DEFAULT_DATA_FOLDERS = {"cifar10": "cifar10-jpeg", "imagenet30": "imagenet30-samples"}


def seed_for(*parts: object) -> int:
    """A 31-bit seed that depends only on ``parts`` (same on every process and platform)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def run_experiment(config: ExperimentConfig, run_dir: str | Path, show_progress: bool = True) -> dict:
    """Run (or resume) ``config`` in ``run_dir`` and return its summary."""
    run_dir = Path(run_dir)
    device = shard_device(resolve_device(config.device))
    shard = current_shard(device)
    if shard.is_main:
        _claim_run_dir(run_dir, config)
    shard.barrier()
    clock = RunClock(run_dir / "metadata.json")
    data = load_experiment_data(config)
    defenses = build_defenses(config, device)
    check_compatible(config, data, defenses, device)
    done = {record_key(r) for r in _existing_records(run_dir)}
    batches = list(enumerate(range(0, len(data), config.batch_size)))
    work = [(b, start) for b, start in batches if shard.owns(b)]
    writer_path = run_dir / (RESULTS if shard.world_size == 1 else f"results.rank{shard.rank}.jsonl")
    pairs = [(d, a) for d in config.defenses for a in config.attacks]
    with RecordWriter(writer_path) as writer, tqdm(total=len(work) * len(pairs), disable=not show_progress,
                                                   desc=config.name, dynamic_ncols=True) as progress:
        for batch_index, start in work:
            indices = list(range(start, min(start + config.batch_size, len(data))))
            crafted: dict[tuple[str, str], torch.Tensor] = {}
            for defense_config, attack in pairs:
                keys = [(i, defense_config.name, attack.name) for i in indices]
                if not all(key in done for key in keys):
                    records = _evaluate_batch(config, defenses[defense_config.name], defense_config,
                                              attack, data, indices, batch_index, device, run_dir,
                                              crafted)
                    writer.write(records)
                progress.update(1)
            if shard.is_main:
                clock.save()
    shard.barrier()
    summary = _finalize(config, run_dir, shard, clock, device) if shard.is_main else {}
    finish(shard)
    return summary


def load_experiment_data(config: ExperimentConfig) -> LabelledImages:
    """The evaluation images: a seeded subset of ``limit`` samples of the configured dataset."""
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
    victim = load_classifier(config.models.victim, arch=config.models.victim_arch, device=device)
    needs_diffusion = any(d.kind == "purifier" for d in config.defenses)
    diffusion = load_diffusion(config.models.diffusion).to(device) if needs_diffusion else None
    return {d.name: _build_defense(d, config, victim, diffusion, device) for d in config.defenses}


def _build_defense(spec: DefenseConfig, config: ExperimentConfig, victim, diffusion, device) -> DefendedClassifier:
    if spec.kind == "none":
        return DefendedClassifier(victim, None)
    if spec.kind == "classifier":
        if spec.classifier is None:
            raise ValueError(f"defence {spec.name!r} of kind 'classifier' needs 'classifier'")
        robust = load_classifier(spec.classifier, arch=spec.classifier_arch, device=device)
        return DefendedClassifier(robust, None)
    if spec.kind == "preprocessing":
        from ..defenses.preprocessing import build_preprocessing

        options = dict(spec.preprocessing)
        return DefendedClassifier(victim, build_preprocessing(options.pop("name"), **options), spec.votes)
    options = {"precision": config.precision, **spec.purifier}
    purifier_config = recommended_purifier_config(config.data.dataset, options.pop("guidance", "victim"),
                                                  **options)
    return build_purified_classifier(victim, diffusion, purifier_config, spec.votes)


def _evaluate_batch(config: ExperimentConfig, defense: DefendedClassifier, spec: DefenseConfig,
                    attack: AttackConfig, data: LabelledImages, indices: list[int],
                    batch_index: int, device: torch.device, run_dir: Path,
                    crafted: dict[tuple[str, str], torch.Tensor]) -> list[dict]:
    """Attack one batch and score the defended predictions (fresh or frozen randomness)."""
    images = data.images[indices].to(device)
    labels = data.labels[indices].to(device)
    seed = seed_for(config.seed, spec.name, attack.name, batch_index)
    adversarial = _adversarial_examples(config, defense, spec, attack, images, labels, batch_index, crafted)
    scorer = evaluation_model(defense, attack, seed)
    with torch.no_grad():
        predictions = scorer(adversarial).argmax(1)
    if batch_index == 0:
        _save_examples(run_dir, spec.name, attack.name, images, adversarial, scorer)
    return [{"index": i, "defense": spec.name, "attack": attack.name, "label": int(y),
             "prediction": int(p), "correct": bool(p == y)}
            for i, y, p in zip(indices, labels.tolist(), predictions.tolist())]


def _adversarial_examples(config: ExperimentConfig, defense: DefendedClassifier, spec: DefenseConfig,
                          attack: AttackConfig, images: torch.Tensor, labels: torch.Tensor,
                          batch_index: int, crafted: dict[tuple[str, str], torch.Tensor]) -> torch.Tensor:
    """One batch's examples for ``attack``, crafted once per batch and reused (as a warm start,
    or across defences for transfer attacks, which do not depend on the defence). Seeds depend
    only on names and the batch, so recrafting after a resume gives the same examples."""
    owner = "" if attack.kind == "transfer" else spec.name
    if (owner, attack.name) not in crafted:
        start = None
        if attack.start_from is not None:
            source = next(a for a in config.attacks if a.name == attack.start_from)
            start = _adversarial_examples(config, defense, spec, source, images, labels, batch_index, crafted)
        seed = seed_for(config.seed, *filter(None, [owner, attack.name]), batch_index)
        crafted[owner, attack.name] = craft(attack, defense, images, labels, seed, start).detach()
    return crafted[owner, attack.name]


def _save_examples(run_dir: Path, defense: str, attack: str, images, adversarial, scorer) -> None:
    """A few clean / adversarial / purified images for the report's grid."""
    clean, adv = images[:EXAMPLES_PER_PAIR], adversarial[:EXAMPLES_PER_PAIR]
    with torch.no_grad():
        purified = scorer.purifier(adv) if scorer.purifier is not None else adv
    save_tensors({"clean": clean, "adversarial": adv, "purified": purified},
                 run_dir / "examples" / f"{defense}__{attack}.safetensors")


def _existing_records(run_dir: Path) -> list[dict]:
    records = read_records(run_dir / RESULTS)
    for part in sorted(run_dir.glob("results.rank*.jsonl")):
        records += read_records(part)
    return records


def _claim_run_dir(run_dir: Path, config: ExperimentConfig) -> None:
    """Create the run directory, or check that it holds this same experiment before resuming."""
    run_dir.mkdir(parents=True, exist_ok=True)
    stored = run_dir / "config.yaml"
    text = yaml.safe_dump(asdict(config), sort_keys=True)
    if stored.is_file() and stored.read_text() != text:
        raise ValueError(f"{run_dir} holds a different experiment (its config.yaml differs); "
                         "use another --out directory or delete it")
    stored.write_text(text)


def _finalize(config: ExperimentConfig, run_dir: Path, shard: Shard, clock: RunClock,
              device: torch.device) -> dict:
    """Merge shard files into one canonical results file; write metadata and summary."""
    records = {record_key(r): r for r in _existing_records(run_dir)}
    write_sorted(list(records.values()), run_dir / RESULTS)
    for part in run_dir.glob("results.rank*.jsonl"):
        part.unlink()
    summary = summarize(list(records.values()), config)
    metadata = {"experiment": config.name, "seed": config.seed, "processes": shard.world_size,
                "wall_time_seconds": round(clock.seconds(), 1), **environment(device)}
    (run_dir / "metadata.json").write_text(json.dumps(metadata, indent=2))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
