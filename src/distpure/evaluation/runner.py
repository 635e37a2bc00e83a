"""Run an experiment: every (sample, defence, attack) record appended as soon as it exists.

The files of a run directory are defined in ``rundir``; who scores with which noise in
``protocol``. Each batch is attacked once per (defence, attack) and every example scored by
the experiment's R draws.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from torch import nn
from tqdm import tqdm

from ..atomic import write_atomically
from ..attacks.suite import AttackConfig, Crafted, craft, resumable
from ..data import LabelledImages, default_data_root, load_dataset
from ..defenses.defended import DefendedClassifier
from ..defenses.recommended import build_purified_classifier
from ..devices import hardware, resolve_device
from ..models.classifiers import load_classifier
from ..models.diffusion_loader import load_diffusion
from ..models.noise_predictor import NoisePredictor
from ..models.weights import load_state_dict, save_tensors
from .config import DefenseConfig, ExperimentConfig
from .distributed import Shard, current_shard, finish, shard_device
from .metadata import RunClock, environment
from ..seeding import derive_seed
from .cascade import breaking_record, drop_stale_skips, skipped_record
from .convergence import continued_attack
from .protocol import SELECTION_FIELD, predict_draws, scorers, selection_stream
from .records import Key, RecordWriter, check_dataset_indices, record_key, write_sorted
from .resolved import check_stamps, claim_run_dir, resolved_settings, run_stamp
from .rundir import ProgressFile, RunDirectory
from .summary import summarize
from .timing import unit_timing

EXAMPLES_PER_PAIR = 8
KINDS_NOT_KEPT = ("clean", "transfer")  # their examples cost nothing, or only the victim, to recraft
_LOG = logging.getLogger("distpure")
DEFAULT_DATA_FOLDERS = {"cifar10": "cifar10-jpeg", "imagenet30": "imagenet30-samples"}


def run_experiment(config: ExperimentConfig, run_dir: str | Path, show_progress: bool = True,
                   new_resumption: bool = False) -> dict:
    """Run (or resume) ``config`` in ``run_dir`` and return its summary. Records made by another
    package version or resolved precision, and cascade skips that no longer hold, are not
    resumed, unless ``new_resumption`` (then this session's records carry their own stamp, which
    the report keeps apart, and the attacks of stale skips rerun)."""
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
    stamp = run_stamp(hardware(device, config.precision)["resolved_precision"])
    check_stamps(files, existing, stamp, new_resumption)
    written = {record_key(r): r for r in existing}
    drop_stale_skips(files.root, config, written, written, refuse=not new_resumption)
    batches = list(enumerate(range(0, len(data), config.batch_size)))
    work = [(b, start) for b, start in batches if shard.owns(b)]
    writer_path = files.results if shard.world_size == 1 else files.shard_results(shard.rank)
    pairs = [(d, a) for d in config.defenses for a in config.attacks if a.applies_to(d.name)]
    with RecordWriter(writer_path) as writer, tqdm(total=len(work) * len(pairs), disable=not show_progress,
                                                   desc=config.name, dynamic_ncols=True) as progress:
        for batch_index, start in work:
            batch = Batch(config, data, list(range(start, min(start + config.batch_size, len(data)))),
                          batch_index, device, files, written, clock if shard.is_main else None)
            crafted: dict[tuple[str, str], Crafted] = {}
            for defense_config, attack in pairs:
                keys = [(i, defense_config.name, attack.name) for i in batch.indices]
                drop_stale_skips(files.root, config, written, keys, refuse=False)  # made stale by units rerun here
                if not all(key in written for key in keys):
                    started, batch.unit_progress = time.monotonic(), []
                    records = [{**record, **stamp} for record in _evaluate_batch(
                        batch, defenses[defense_config.name], defense_config, attack, crafted)]
                    writer.write(records)
                    seconds = time.monotonic() - started + sum(p.earlier_seconds for p in batch.unit_progress)
                    for kept_progress in batch.unit_progress:
                        kept_progress.clear()
                    _append_jsonl(files.timings, unit_timing(defense_config.name, attack.name, batch_index,
                                                             seconds, records))
                    written.update((record_key(r), r) for r in records)
                    if shard.is_main:  # a unit can take an hour: a killed session keeps its time
                        clock.save()
                progress.update(1)
    shard.barrier()
    summary = _finalize(config, files, shard, clock, device) if shard.is_main else {}
    finish(shard)
    return summary


def load_experiment_data(config: ExperimentConfig) -> LabelledImages:
    """The evaluation images: ``limit`` samples of the configured dataset after the first
    ``start``, in seeded random order (so the records of a run stopped early are a fair sample)."""
    data_config = config.data
    root = data_config.root or default_data_root() / DEFAULT_DATA_FOLDERS.get(data_config.dataset, "")
    count = None if data_config.limit is None else data_config.start + data_config.limit
    data = load_dataset(data_config.dataset, root, data_config.split, count, data_config.seed, data_config.size)
    return data.without_first(data_config.start) if data_config.start else data


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
            raise ValueError(f"defence {spec.name!r}: diffusion model {config.diffusion_for(spec)!r} works on "
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
    """Every configured defence, sharing one victim and each diffusion model (loaded once)."""
    victim = load_classifier(config.models.victim, arch=config.models.victim_arch, device=device,
                             **config.models.victim_options)
    users: dict[str, list[str]] = {}
    for spec in config.defenses:
        if spec.kind == "purifier":
            users.setdefault(config.diffusion_for(spec), []).append(spec.name)
    diffusions = {name: _load_diffusion_for(name, defenses).to(device) for name, defenses in users.items()}
    return {d.name: _build_defense(d, config, victim, diffusions, device) for d in config.defenses}


def _load_diffusion_for(name: str, defenses: list[str]) -> NoisePredictor:
    """``load_diffusion(name)``, its error naming the defences that use the model."""
    try:
        return load_diffusion(name)
    except (KeyError, FileNotFoundError, ValueError, ImportError) as error:
        raise ValueError(f"the diffusion model of defence(s) {', '.join(defenses)}: {error}") from error


def _build_defense(spec: DefenseConfig, config: ExperimentConfig, victim: nn.Module,
                   diffusions: dict[str, NoisePredictor], device: torch.device) -> DefendedClassifier:
    if spec.kind == "none":
        return DefendedClassifier(victim, None)
    if spec.kind == "classifier":
        robust = load_classifier(spec.classifier, arch=spec.classifier_arch, device=device,
                                 **spec.classifier_options)
        return DefendedClassifier(robust, None)
    if spec.kind == "preprocessing":
        return DefendedClassifier(victim, spec.build_preprocessing(), spec.votes)
    return build_purified_classifier(victim, diffusions[config.diffusion_for(spec)],
                                     config.purifier_config(spec), spec.votes)


@dataclass
class Batch:
    """One batch of the evaluation: where its images are, what the run is, the records written
    so far (the cascade reads earlier attacks' records), the run's wall clock (the main
    process's, saved with every iteration an attack keeps) and the progress files of the
    attacks the current unit crafts (their earlier sessions' seconds count in its time; they go
    once its records are written)."""

    config: ExperimentConfig
    data: LabelledImages
    indices: list[int]
    number: int
    device: torch.device
    files: RunDirectory
    written: dict[Key, dict]
    clock: RunClock | None
    unit_progress: list[ProgressFile] = field(default_factory=list)

    @property
    def images(self) -> torch.Tensor:
        return self.data.images[self.indices].to(self.device)

    @property
    def labels(self) -> torch.Tensor:
        return self.data.labels[self.indices].to(self.device)

    @property
    def dataset_indices(self) -> list[int]:
        return [int(self.data.indices[i]) for i in self.indices]

    def breaking_records(self, spec: DefenseConfig, attack: AttackConfig) -> list[dict | None]:
        """Per sample, the record of the earlier attack that broke it (the cascade skips it),
        or None where ``attack`` must attack it."""
        return [breaking_record(self.config, spec.name, attack, i, self.written) for i in self.indices]


def _evaluate_batch(batch: Batch, defense: DefendedClassifier, spec: DefenseConfig,
                    attack: AttackConfig, crafted: dict[tuple[str, str], Crafted]) -> list[dict]:
    """Attack one batch, then classify every example with the experiment's R scoring draws
    and, on a stream of their own, its selection draws (the attacker's queries; under frozen
    noise both are the attacker's frozen draw), one record per sample; samples an earlier
    attack of the cascade broke are recorded as its, unattacked and unscored. The same draws also score what
    the attack had at the start of its last quarter (``late_predictions``) and, for an attack
    that continues another, the examples it started from (``start_predictions``): paired
    measures of what its last quarter, and the whole continuation, gained."""
    config, labels = batch.config, batch.labels
    breaking = batch.breaking_records(spec, attack)
    attacked = [p for p, record in enumerate(breaking) if record is None]
    result = adversarial_examples(batch, defense, spec, attack, crafted)
    if result.warnings:
        _append_warnings(batch.files, spec.name, attack.name, batch.number, result.warnings)
    seed = unit_seed(config, spec.name, attack.name, batch.number)
    examples = result.examples[attacked]
    _keep_examples(batch, spec.name, attack, attacked, examples, replace=True)

    def score(images: torch.Tensor | None, draws: int = config.evaluation.draws,
              stream: int = seed) -> Iterator[list[int]] | None:
        """Per attacked sample, the predictions of ``draws`` draws of ``stream``: fresh scorers
        seeded alike replay the same draws at every call."""
        if images is None or not attacked:
            return None
        return iter(predict_draws(scorers(defense, draws, stream, result.frozen_scorer), images[attacked]))

    scored, late = score(result.examples), score(result.late_examples)
    selected = score(result.examples, config.evaluation.selection_draws, selection_stream(seed))
    start = score(result.start) if continued_attack(config, attack) is not None else None
    if batch.number == 0 and attacked:
        first_draw = scorers(defense, 1, seed, result.frozen_scorer)[0]  # replays the scored draw 0
        _save_examples(batch.files, spec.name, attack.name, batch.images[attacked], examples, first_draw)
    broken = result.broken.tolist() if result.broken is not None else [False] * len(labels)
    records = []
    for p, (i, key, y) in enumerate(zip(batch.indices, batch.dataset_indices, labels.tolist())):
        if breaking[p] is not None:
            records.append(skipped_record(breaking[p], attack.name))
            continue
        records.append({"index": i, "dataset_index": key, "defense": spec.name, "attack": attack.name,
                        "label": int(y), "predictions": next(scored), SELECTION_FIELD: next(selected),
                        **({"late_predictions": next(late)} if late is not None else {}),
                        **({"start_predictions": next(start)} if start is not None else {}),
                        **({"verdict": "broken"} if broken[p] else {})})
    return records


def unit_seed(config: ExperimentConfig, defense: str, attack: str, batch: int) -> int:
    """The seed of one (defence, attack, batch) unit's scoring draws, from which its selection
    draws' stream derives too (``selection_stream``)."""
    return derive_seed(config.seed, defense, attack, batch)


def adversarial_examples(batch: Batch, defense: DefendedClassifier, spec: DefenseConfig,
                         attack: AttackConfig, crafted: dict[tuple[str, str], Crafted]) -> Crafted:
    """One batch's examples for ``attack`` (the start, or the clean image, where the cascade
    skipped a sample), crafted once per batch and reused as a warm start, and, for transfer
    attacks, across every defence whose examples come from the same model (the key names that
    model; transfer examples are crafted for every sample). Seeds depend only on names and the
    batch, and the cascade only on records, so recrafting after a resume gives the same examples;
    a warm start not crafted in this session is read back from the examples kept on disk when
    they cover the samples to attack (and kept there when crafted)."""
    config = batch.config
    shared = attack.kind == "transfer"
    key = crafted_key(spec, attack, config)
    owner = key[0]
    if key not in crafted:
        rows = list(range(len(batch.indices))) if shared else _attacked_rows(batch, spec, attack)
        start = None
        if attack.start_from is not None and rows:
            source = next(a for a in config.attacks if a.name == attack.start_from)
            if crafted_key(spec, source, config) not in crafted:
                start = kept_examples(batch, spec.name, source.name, rows)
                if start is not None and (leftover := _progress(batch, spec, source)) is not None:
                    leftover.load()  # crafted and kept by a killed session: its time counts here
            if start is None:
                start = adversarial_examples(batch, defense, spec, source, crafted).examples
                source_rows = _attacked_rows(batch, spec, source)
                _keep_examples(batch, spec.name, source, source_rows, start[source_rows], replace=False)
        result = _craft_rows(batch, defense, spec, attack, owner, start, rows)
        if result.trace:
            _append_jsonl(batch.files.traces, {"owner": owner, "attack": attack.name, "batch": batch.number,
                                               "n": len(rows), "trace": result.trace})
        crafted[key] = result
    return crafted[key]


def _attacked_rows(batch: Batch, spec: DefenseConfig, attack: AttackConfig) -> list[int]:
    """The batch positions ``attack`` attacks on ``spec``: those no earlier attack of the cascade broke."""
    return [p for p, record in enumerate(batch.breaking_records(spec, attack)) if record is None]


def crafted_key(spec: DefenseConfig, attack: AttackConfig, config: ExperimentConfig) -> tuple[str, str]:
    """Whose examples these are: (defence, attack), or (``victim=<name>``, attack) for a transfer
    attack, whose examples every defence behind the same victim shares."""
    return (f"victim={_victim_name(spec, config)}" if attack.kind == "transfer" else spec.name), attack.name


def _keep_examples(batch: Batch, defense: str, attack: AttackConfig, rows: list[int], examples: torch.Tensor,
                   replace: bool) -> None:
    """Keep an adaptive attack's examples of ``rows`` on disk (written whole, then renamed, so a
    killed session never leaves half a file): always when they are being scored, and when only
    recrafted as a warm start, if none are kept yet (those that were scored stay)."""
    path = batch.files.crafted_file(defense, attack.name, batch.number)
    if not rows or attack.kind in KINDS_NOT_KEPT or (path.is_file() and not replace):
        return
    write_atomically(path, lambda tmp: save_tensors({"examples": examples, "rows": torch.tensor(rows)}, tmp))


def kept_examples(batch: Batch, defense: str, attack: str, rows: list[int]) -> torch.Tensor | None:
    """``attack``'s kept examples of this batch (other rows: the clean images), if kept for
    every row in ``rows`` and readable. Within a threat group a later attack of the cascade
    attacks only samples every earlier one attacked, so a warm start is read back instead of
    recrafted with its whole chain."""
    path = batch.files.crafted_file(defense, attack, batch.number)
    if not path.is_file():
        return None
    try:
        kept = load_state_dict(path)
    except (OSError, ValueError, SafetensorError) as error:  # e.g. cut short by a full disk
        _LOG.warning("cannot read %s (%s): recrafting its examples", path, error)
        path.unlink()
        return None
    positions = kept["rows"].tolist()
    if not set(rows) <= set(positions):
        return None
    examples = batch.images.clone()
    examples[positions] = kept["examples"].to(examples)
    return examples


def kept_rows(files: RunDirectory, defense: str, attack: str, batch: int) -> list[int]:
    """The batch positions whose examples ``attack`` keeps for ``batch``; none where it keeps no
    readable file. Reads only: an unreadable file stays for ``kept_examples`` to handle."""
    try:
        return load_state_dict(files.crafted_file(defense, attack, batch))["rows"].tolist()
    except (OSError, ValueError, KeyError, SafetensorError):
        return []


def _craft_rows(batch: Batch, defense: DefendedClassifier, spec: DefenseConfig, attack: AttackConfig,
                owner: str, start: torch.Tensor | None, rows: list[int]) -> Crafted:
    """``attack`` crafted on the batch's ``rows`` only, its examples and verdict spread back over
    the whole batch (other rows keep ``start`` or the clean image, and no verdict)."""
    config, images = batch.config, batch.images
    examples = (start if start is not None else images).clone()
    if not rows:
        return Crafted(examples)
    seed = derive_seed(config.seed, owner, attack.name, batch.number)
    frozen_seed = derive_seed(config.seed, spec.name, "frozen-noise")  # one draw per defence
    keys = [batch.dataset_indices[p] for p in rows]
    result = craft(attack, defense, images[rows], batch.labels[rows], seed,
                   start[rows] if start is not None else None, keys, frozen_seed, _progress(batch, spec, attack))
    examples[rows] = result.examples.detach().to(examples)
    broken = late = None
    if result.broken is not None:
        broken = torch.zeros(len(images), dtype=torch.bool, device=result.broken.device)
        broken[rows] = result.broken
    if result.late_examples is not None:
        late = (start if start is not None else images).clone()
        late[rows] = result.late_examples.detach().to(late)
    return Crafted(examples, broken, result.frozen_scorer, result.warnings, result.trace, late, start)


def _progress(batch: Batch, spec: DefenseConfig, attack: AttackConfig) -> ProgressFile | None:
    """Where ``attack`` keeps its progress on this batch while crafted (None for a kind that
    cannot resume, or whose examples are not kept), noted as part of the current unit."""
    if attack.kind in KINDS_NOT_KEPT or not resumable(attack):
        return None
    progress = ProgressFile(batch.files.progress_file(spec.name, attack.name, batch.number),
                            on_save=batch.clock.save if batch.clock is not None else None)
    batch.unit_progress.append(progress)
    return progress


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
    """A few clean / adversarial / purified images for the report's grid; ``scorer`` is a fresh
    copy of the first scoring draw, so its purification of the scored examples is that draw's."""
    with torch.no_grad():
        purified = scorer.purifier(adversarial) if scorer.purifier is not None else adversarial
    clean, adv, purified = (x[:EXAMPLES_PER_PAIR] for x in (images, adversarial, purified))
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
    files.metadata.write_text(json.dumps(metadata, indent=2))
    return write_summary(files, config, records, metadata["hardware"])


def write_summary(files: RunDirectory, config: ExperimentConfig, records: list[dict], hardware_info: dict) -> dict:
    """Write (and return) ``summary.json``: the summary of ``records``, with the hardware of the run."""
    summary = {**summarize(records, config), "hardware": hardware_info}
    files.summary.write_text(json.dumps(summary, indent=2))
    return summary
