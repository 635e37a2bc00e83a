"""The check that makes certificates and attacks trustworthy together: SmoothAdv on a
certification run's smoothed classifier, each example scored by PREDICT, and the count of
certificate violations.

For every image the attacked setting has certified, SmoothAdv (``attacks.smoothadv``) crafts an
example within ε on noise of its own, and PREDICT classifies it with ``n`` draws the attacker
never saw (abstaining counts as wrong). A sample whose CERTIFY record certifies its label at a
radius of at least ε, but whose example PREDICT assigns another class (not an abstention), is a
violation: the certificate or PREDICT erred (each with probability at most α), or the code is
wrong. Records go to ``attack.jsonl`` beside the certificates, one per sample, seeded per sample
from (seed, setting, dataset index), so a resumed or sharded attack writes the same records.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from ..atomic import write_atomically
from ..attacks.smoothadv import SmoothAdv
from ..data import LabelledImages
from ..evaluation.distributed import finish
from ..evaluation.records import RecordWriter, read_records
from ..evaluation.resolved import differences, package_version
from ..evaluation.rundir import RunDirectory
from ..evaluation.stats import accuracy
from ..seeding import derive_seed
from .config import CertifyConfig, SettingConfig
from .denoisers import DenoisedClassifier
from .runner import certify_records, check_indices, open_run
from .smoothing import SmoothedClassifier
from .summary import certified_correct


class AttackFiles:
    """The attack's files in a run directory: its records (per process under torchrun, merged at
    the end), the settings that shaped them (a resume refuses others) and its summary."""

    def __init__(self, files: RunDirectory) -> None:
        self.root = files.root
        self.records = self.root / "attack.jsonl"
        self.settings = self.root / "attack.json"
        self.summary = self.root / "attack-summary.json"

    def shard_records(self, rank: int) -> Path:
        return self.root / f"attack.rank{rank}.jsonl"

    def shard_record_files(self) -> list[Path]:
        return sorted(self.root.glob("attack.rank*.jsonl"))


def attack_seed(config: CertifyConfig, dataset_index: int) -> int:
    """The seed of every stream the attacker draws for one sample."""
    return derive_seed(config.seed, "smoothadv", config.attack.setting, int(dataset_index))


def scorer_seed(config: CertifyConfig, dataset_index: int) -> int:
    """The seed of PREDICT's draws on one sample's example: a stream the attacker never saw."""
    return derive_seed(config.seed, "smoothadv-predict", config.attack.setting, int(dataset_index))


def is_violation(certificate: dict, predicted: int | None, epsilon: float) -> bool:
    """Whether PREDICT's class on an example within ``epsilon`` contradicts ``certificate`` (a
    CERTIFY record): its label certified at radius ≥ ε, and another class predicted (an
    abstention contradicts nothing)."""
    return certified_correct(certificate, epsilon) and predicted is not None and predicted != certificate["label"]


def attack_records(files: AttackFiles) -> list[dict]:
    """Every complete attack record (merged file and shard files), one per image position."""
    records = {}
    for path in [files.records, *files.shard_record_files()]:
        for record in read_records(path):
            records[int(record["index"])] = record
    return [records[index] for index in sorted(records)]


def targets(config: CertifyConfig, certificates: dict[int, dict], available: int | None = None) -> list[int]:
    """The image positions to attack: those among the first ``limit`` of the attack (and of its
    setting, and of the ``available`` images if known) that have a CERTIFY record (the others
    wait for theirs)."""
    limits = [bound for bound in (config.attack.limit, config.setting(config.attack.setting).limit, available)
              if bound is not None]
    return [index for index in sorted(certificates) if all(index < bound for bound in limits)]


def run_attack(config: CertifyConfig, run_dir: str | Path, show_progress: bool = True) -> dict:
    """Attack (or resume attacking) the images ``run_dir``'s run has certified under the config's
    attack section; returns the attack's summary (on the main process)."""
    if config.attack is None:
        raise ValueError(f"{config.name} has no attack section: add one (see docs/attacks.md)")
    run = open_run(config, run_dir, phase="attack")
    files, shard = AttackFiles(run.files), run.shard
    if shard.is_main:
        claim_attack(files, config)
    shard.barrier()
    setting = config.setting(config.attack.setting)
    certificates = {int(r["index"]): r for r in certify_records(run.files) if r["setting"] == setting.name}
    records = attack_records(files)
    check_indices(records, run.data)
    written = {int(r["index"]) for r in records}
    mine = targets(config, certificates, len(run.data))[shard.rank::shard.world_size]
    todo = [index for index in mine if index not in written]
    path = files.records if shard.world_size == 1 else files.shard_records(shard.rank)
    with RecordWriter(path) as writer, tqdm(total=len(mine), initial=len(mine) - len(todo), dynamic_ncols=True,
                                            disable=not show_progress, desc=f"smoothadv {setting.name}") as progress:
        for index in todo:
            writer.write([attack_sample(config, setting, run.bases[setting.name], run.data, index,
                                        certificates[index], run.device)])
            progress.update(1)
    shard.barrier()
    summary = {}
    if shard.is_main:
        summary = _finish_attack(config, files)
    finish(shard)
    return summary


def attack_sample(config: CertifyConfig, setting: SettingConfig, base: DenoisedClassifier, data: LabelledImages,
                  index: int, certificate: dict, device: torch.device) -> dict:
    """Attack one image and score its example by PREDICT, as its record."""
    attack = config.attack
    dataset_index, label = int(data.indices[index]), int(data.labels[index])
    if (int(certificate["dataset_index"]), int(certificate["label"])) != (dataset_index, label):
        raise ValueError(f"the CERTIFY record of {setting.name} #{index} is of another image")
    image = data.images[index:index + 1].to(device)
    started = time.monotonic()
    smoothadv = SmoothAdv(attack, setting.sigma, config.batch_size)
    crafted = smoothadv.perturb(base, image, torch.tensor([label], device=device), attack_seed(config, dataset_index))
    smoothed = SmoothedClassifier(base, len(data.classes), setting.sigma, config.batch_size, device)
    verdict = smoothed.predict(crafted.examples[0], attack.n, config.alpha, scorer_seed(config, dataset_index))
    return {"index": index, "dataset_index": dataset_index, "setting": setting.name, "sigma": setting.sigma,
            "label": label, "epsilon": attack.epsilon, "certified_radius": certificate["radius"],
            "certified_correct": bool(certificate["correct"]),
            "certified_at_epsilon": certified_correct(certificate, attack.epsilon),
            "perturbation_norm": float((crafted.examples - image).norm()),
            "attack_probability": float(crafted.probability[0]),
            "predicted": verdict.predicted, "p_value": verdict.p_value, "counts": verdict.counts,
            "abstained": verdict.predicted is None, "correct": verdict.predicted == label,
            "violation": is_violation(certificate, verdict.predicted, attack.epsilon),
            "seconds": round(time.monotonic() - started, 3),
            "denoiser_calls": base.denoiser_calls * smoothadv.draws_per_sample + verdict.denoiser_calls}


def record_settings(config: CertifyConfig) -> dict:
    """What shapes an attack record beyond the certification run (which ``claim_certify_dir``
    checks): the attack section but its image limit, and the distpure version."""
    attack = {k: v for k, v in asdict(config.attack).items() if k != "limit"}
    return {"distpure": package_version(), "attack": attack}


def claim_attack(files: AttackFiles, config: CertifyConfig) -> None:
    """Before resuming an attack, check that its records were made with these settings; refuse
    otherwise, naming what differs (a new attack needs another --out, or its files deleted)."""
    current = record_settings(config)
    if files.settings.is_file() and attack_records(files):
        changed = differences(json.loads(files.settings.read_text()), current)
        if changed:
            raise ValueError(f"{files.root} holds attack records of other settings ({'; '.join(changed[:8])}); "
                             f"delete {files.records.name} and {files.settings.name} to attack anew, "
                             "or use another --out directory")
    files.settings.write_text(json.dumps(current, indent=2, sort_keys=True))


def summarize_attack(records: list[dict], alpha: float, waiting: int = 0) -> dict:
    """Accuracy under attack (PREDICT right; abstaining is wrong) with a 95 % Wilson interval,
    abstentions, how many attacked samples were certified at ε and how many of those are
    violations (≈ 2α of them could be by chance: the certificate and PREDICT each err with
    probability at most α), and the cost per image. ``waiting``: targets without a record yet."""
    total = len(records)
    result = accuracy(sum(bool(r["correct"]) for r in records), total)
    certified = sum(bool(r["certified_at_epsilon"]) for r in records)
    return {"setting": records[0]["setting"] if records else None,
            "epsilon": records[0]["epsilon"] if records else None, "images": total, "waiting": waiting,
            "accuracy": {"value": result.value, "low": result.low, "high": result.high, "correct": int(result.correct)},
            "abstained": sum(bool(r["abstained"]) for r in records), "certified_at_epsilon": certified,
            "violations": sum(bool(r["violation"]) for r in records), "violations_by_chance_at_most": 2 * alpha * certified,
            "seconds_per_image": sum(r["seconds"] for r in records) / total if total else None,
            "denoiser_calls_per_image": sum(r["denoiser_calls"] for r in records) / total if total else None}


def summarize_attack_run(config: CertifyConfig, files: RunDirectory) -> dict:
    """The attack summary of whatever records ``files`` holds (a stopped attack too)."""
    certificates = {int(r["index"]): r for r in certify_records(files) if r["setting"] == config.attack.setting}
    records = attack_records(AttackFiles(files))
    waiting = len(set(targets(config, certificates)) - {int(r["index"]) for r in records})
    return summarize_attack(records, config.alpha, waiting)


def format_attack_summary(summary: dict) -> str:
    """A few plain-text lines: accuracy under attack, certified-at-ε samples and violations."""
    if not summary["images"]:
        return f"SmoothAdv: no attack records yet ({summary['waiting']} certified images waiting)"
    share = summary["accuracy"]
    return "\n".join([
        f"SmoothAdv on {summary['setting']} at L2 epsilon {summary['epsilon']:.4g}: {summary['images']} images "
        f"attacked ({summary['waiting']} more waiting)",
        f"  accuracy under attack (PREDICT, abstain = wrong): {100 * share['value']:.1f} % "
        f"[{100 * share['low']:.1f}, {100 * share['high']:.1f}] ({summary['abstained']} abstained)",
        f"  certified at epsilon: {summary['certified_at_epsilon']}; violations: {summary['violations']} "
        f"(by chance at most ~{summary['violations_by_chance_at_most']:.2g} expected)"])


def _finish_attack(config: CertifyConfig, files: AttackFiles) -> dict:
    """Merge the shard files into attack.jsonl (in image order) and write the summary."""
    records = attack_records(files)
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    write_atomically(files.records, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    for shard_file in files.shard_record_files():
        shard_file.unlink()
    summary = summarize_attack_run(config, RunDirectory(files.root))
    write_atomically(files.summary, lambda tmp: tmp.write_text(json.dumps(summary, indent=2, sort_keys=True)))
    return summary
