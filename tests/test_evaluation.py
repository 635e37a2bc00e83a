"""The evaluation pipeline end to end on tiny models: statistics, the records file, config
validation, interrupted-and-resumed runs, torchrun sharding, and the report.

Nothing here loads the embedded diffusion model. The test writes a tiny random diffusers
directory, a tiny victim (its architecture named in the config as ``module:callable``, the
module on sys.path here and on the ``python -m distpure`` subprocesses' PYTHONPATH) and a
2-class, 12-image folder dataset into a temporary directory.
"""
from __future__ import annotations

import csv
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from distpure.cli.main import main
from distpure.config import from_dict
from distpure.defenses.purifier import PurifierConfig
from distpure.devices import describe_hardware
from distpure.evaluation.cascade import breaking_record, cascade_sources, skipped_record
from distpure.evaluation.config import (DefenseConfig, ExperimentConfig, load_experiment)
from distpure.evaluation.records import RecordWriter, read_records, write_sorted
from distpure.evaluation.resolved import claim_run_dir
from distpure.evaluation.rundir import ProgressFile, RunDirectory
from distpure.evaluation import runner as runner_module
from distpure.evaluation.runner import run_experiment
from distpure.evaluation.stats import accuracy, paired_difference, wilson_interval
from distpure.evaluation.summary import format_table, interval_text, summarize
from distpure.attacks.suite import AttackConfig
from distpure.reporting.report import summary_json, write_report

PLUGIN = "distpure_test_tiny_arch"
ARCH = f"{PLUGIN}:TinyCNN"
# Imported by name from the config in this process and in every subprocess, so both build the
# same network. Its logits carry a strong brightness term so that predictions vary across
# images and react to the attack and to purification.
PLUGIN_SOURCE = '''
import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))

    def forward(self, images):
        brightness = images.mean(dim=(1, 2, 3)) - 0.5
        return self.features(images) + 40.0 * brightness[:, None] * torch.tensor([-1.0, 1.0])


class DarkCNN(TinyCNN):
    # another victim: logits negated, so its attack gradients point the other way
    def forward(self, images):
        return -super().forward(images)
'''
IMAGES_PER_CLASS = 6
BATCH_SIZE = 4
DEFENSES = [{"name": "none", "kind": "none"},
            {"name": "purified", "kind": "purifier", "purifier": {"t_star": 20, "num_steps": 2}}]
ATTACKS = [{"name": "clean", "kind": "clean"},
           {"name": "transfer", "kind": "transfer", "eps": "8/255", "steps": 1},
           {"name": "pgd", "kind": "pgd", "eps": "8/255", "steps": 1, "start_from": "transfer"}]
TOTAL_RECORDS = 2 * IMAGES_PER_CLASS * len(DEFENSES) * len(ATTACKS)
DRAWS = 3


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> SimpleNamespace:
    """Tiny victim weights, a tiny diffusers model, an image-folder dataset, the plugin dir
    (on sys.path while this module's tests run)."""
    root = tmp_path_factory.mktemp("assets")
    plugin_dir = root / "plugin"
    plugin_dir.mkdir()
    (plugin_dir / f"{PLUGIN}.py").write_text(PLUGIN_SOURCE)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(plugin_dir))
        yield _write_assets(root, plugin_dir, importlib.import_module(PLUGIN))
    sys.modules.pop(PLUGIN, None)


def _write_assets(root: Path, plugin_dir: Path, plugin) -> SimpleNamespace:
    """Write the victim weights, the diffusers model and the dataset under ``root``."""
    from diffusers import UNet2DModel

    from distpure.models.diffusion import DiffusionModel, default_scheduler
    from distpure.models.weights import save_state_dict

    torch.manual_seed(0)
    save_state_dict(plugin.TinyCNN(), root / "victim.safetensors")
    # small_unet(channels=(16, 32)) cannot be built (diffusers' 32 GroupNorm groups), so the
    # UNet is built here with 8 groups.
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, norm_num_groups=8, add_attention=False)
    DiffusionModel(unet, default_scheduler()).save_pretrained(root / "diffusion")

    generator = np.random.default_rng(0)
    for label in range(2):
        folder = root / "data" / "test" / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(IMAGES_PER_CLASS):
            brightness = 0.44 + 0.06 * label + 0.06 * generator.random()  # near 0.5
            noise = generator.normal(0.0, 0.15, (8, 8, 3)).repeat(4, 0).repeat(4, 1)
            pixels = np.clip(brightness + noise, 0, 1) * 255
            Image.fromarray(pixels.round().astype(np.uint8)).save(folder / f"{i}.png")
    return SimpleNamespace(root=root, plugin_dir=plugin_dir, victim=root / "victim.safetensors",
                           diffusion=root / "diffusion", data=root / "data")


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread here and in subprocesses: identical float results in every process."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def experiment(assets: SimpleNamespace, **changes) -> dict:
    values = {"name": "tiny", "description": "tiny models on a tiny folder dataset",
              "data": {"dataset": "cifar10", "root": str(assets.data), "limit": None},
              "models": {"victim": str(assets.victim), "victim_arch": ARCH,
                         "diffusion": str(assets.diffusion)},
              "defenses": DEFENSES, "attacks": ATTACKS, "batch_size": BATCH_SIZE, "device": "cpu",
              "evaluation": {"draws": DRAWS}, "paper": {"purified/clean": 90.0}}
    values.update(changes)
    return values


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def subprocess_env(assets: SimpleNamespace) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(assets.plugin_dir), *filter(None, [env.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def config_path(assets) -> Path:
    return write_yaml(assets.root / "tiny.yaml", experiment(assets))


@pytest.fixture(scope="module")
def reference_run(assets, config_path) -> Path:
    """The experiment run uninterrupted, in this process."""
    run_dir = assets.root / "run-a"
    run_experiment(load_experiment(config_path), run_dir, show_progress=False)
    return run_dir


# ----------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("correct, total, low, high", [
    # by hand: z = 1.959964, z^2 = 3.841459, denominator 1 + z^2 / n = 1.3841459
    (0, 10, 0.0, 0.277533),        # centre = half = 0.1920729 / 1.3841459 = 0.1387665
    (5, 10, 0.236593, 0.763407),   # half = z sqrt(0.025 + 0.0096036) / 1.3841459 = 0.263407
    (10, 10, 0.722467, 1.0),       # mirror image of 0 / 10
    (1, 4, 0.045587, 0.699358),
])
def test_wilson_interval_known_values(correct, total, low, high):
    result = wilson_interval(correct, total)
    assert result == pytest.approx((low, high), abs=5e-6)


def test_wilson_interval_edge_cases():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    empty = accuracy(0, 0)
    assert np.isnan(empty.value) and (empty.low, empty.high) == (0.0, 1.0)
    half = accuracy(5, 10)
    assert half.value == 0.5 and str(half) == "50.0 [23.7, 76.3]"
    for n in (1, 7, 50):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            # (k = n gives 0.9999999999999999: float rounding, hence the tolerance)
            assert 0.0 <= lo <= k / n <= hi + 1e-12 and hi <= 1.0


def test_summary_rows_in_config_order():
    config = ExperimentConfig(
        defenses=[DefenseConfig("a", kind="none"),
                  DefenseConfig("b", purifier={"t_star": 50})],
        attacks=[AttackConfig("clean", kind="clean"), AttackConfig("pgd", eps="4/255", steps=3)],
        paper={"b/pgd": 61.5})
    records = [{"index": i, "defense": d, "attack": a, "label": 0, "prediction": 0,
                "correct": correct}
               for i, correct in enumerate([True, True, False, True])
               for d, a in [("a", "clean"), ("b", "pgd"), ("b", "clean")]]
    records += [{"index": 0, "defense": "unconfigured", "attack": "pgd", "correct": True}]
    rows = summarize(records, config)["rows"]
    assert [(r["defense"], r["attack"]) for r in rows] == [
        ("a", "clean"), ("a", "pgd"), ("b", "clean"), ("b", "pgd"), ("a", "worst-case"), ("a", "resubmission"),
        ("b", "worst-case"), ("b", "resubmission")]
    by_pair = {(r["defense"], r["attack"]): r for r in rows}
    assert by_pair["a", "clean"]["correct"] == 3 and by_pair["a", "clean"]["total"] == 4
    assert by_pair["a", "clean"]["accuracy"] == 0.75
    assert (by_pair["a", "clean"]["ci_low"], by_pair["a", "clean"]["ci_high"]) == wilson_interval(3, 4)
    assert by_pair["a", "pgd"]["total"] == 0 and np.isnan(by_pair["a", "pgd"]["accuracy"])
    assert by_pair["b", "pgd"]["paper"] == 61.5 and by_pair["b", "clean"]["paper"] is None
    assert by_pair["b", "pgd"]["eps"] == pytest.approx(4 / 255)
    assert by_pair["b", "pgd"]["purifier"] == {"t_star": 50}
    assert by_pair["b", "pgd"]["steps"] == 3
    table = format_table(summarize(records, config))
    assert "75.0 [30.1, 95.4]" in table and " - " in table


def test_worst_case_is_per_threat_group_and_requires_clean():
    """A sample counts as robust only if it is right when clean and survives every attack of its
    group (norm, ε, fresh or frozen noise); every group is reported, a lone attack's too."""
    config = ExperimentConfig(
        defenses=[DefenseConfig("d", kind="none")],
        attacks=[AttackConfig("clean", kind="clean"), AttackConfig("a", steps=5),
                 AttackConfig("b", kind="bpda", steps=7, eot=3), AttackConfig("l2", norm="l2", eps=0.5),
                 AttackConfig("frozen", frozen_noise=True)])
    outcomes = {"clean": [1, 1, 1, 0], "a": [1, 0, 1, 1], "b": [1, 1, 0, 1], "l2": [0, 1, 1, 1],
                "frozen": [1, 1, 1, 1]}
    records = [{"index": i, "defense": "d", "attack": attack, "correct": bool(value)}
               for attack, values in outcomes.items() for i, value in enumerate(values)]
    rows = {r["attack"]: r for r in summarize(records, config)["rows"]}
    worst = rows["worst-case-linf-0.0313725"]  # sample 3 survives a and b but is wrong when clean
    assert (worst["correct"], worst["total"]) == (1, 4)
    assert worst["over"] == ["clean", "a", "b"] and (worst["steps"], worst["eot"]) == (7, 3)
    assert (rows["worst-case-l2-0.5"]["correct"], rows["worst-case-linf-0.0313725-frozen"]["correct"]) == (2, 3)
    assert rows["worst-case-linf-0.0313725-frozen"]["over"] == ["clean", "frozen"]  # not pooled with a, b
    assert (rows["a"]["correct"], rows["b"]["correct"]) == (3, 3)


def test_paired_worst_cases_keep_attacks_defined_for_one_side():
    """A surrogate that runs against the guided defence only stays in its worst case (dropping
    it would flatter that defence), and the comparison names both sides' attacks."""
    config = ExperimentConfig(
        defenses=[DefenseConfig("base", kind="none"), DefenseConfig("guided", kind="none")],
        attacks=[AttackConfig("clean", kind="clean"), AttackConfig("pgd"),
                 AttackConfig("surrogate", defenses=["guided"])], baseline="base")
    right = {("base", "clean"): [1, 1], ("base", "pgd"): [0, 1],
             ("guided", "clean"): [1, 1], ("guided", "pgd"): [1, 1], ("guided", "surrogate"): [0, 1]}
    records = [{"index": i, "defense": d, "attack": a, "correct": bool(v)}
               for (d, a), values in right.items() for i, v in enumerate(values)]
    worst = next(c for c in summarize(records, config)["comparisons"] if c["column"] == "worst-case")
    assert worst["over"] == ["clean", "pgd", "surrogate"] and worst["baseline_over"] == ["clean", "pgd"]
    assert worst["expected"]["mean"] == 0.0  # sample 0 falls to the surrogate; without it, +50 points


def _drawn(index: int, attack: str, predictions: list[int], **extra) -> dict:
    return {"index": index, "defense": "d", "attack": attack, "label": 1, "predictions": predictions, **extra}


def test_the_worst_case_picks_on_selection_draws_and_scores_on_others():
    """An attacker who picks per sample among candidates of equal true accuracy gains nothing:
    picked on selection draws of their own, the estimate is unbiased; picked on the scoring draws
    themselves (the rule before 0.3) it is biased low."""
    import random

    rng = random.Random(0)
    config = ExperimentConfig(defenses=[DefenseConfig("d", kind="none")],
                              attacks=[AttackConfig("clean", kind="clean"), AttackConfig("a"), AttackConfig("b"),
                                       AttackConfig("c")], evaluation={"draws": 4, "selection_draws": 4})
    truth = {"clean": 0.9, "a": 0.5, "b": 0.5, "c": 0.5}  # the attacks are equally strong
    draw = lambda p: [1 if rng.random() < p else 0 for _ in range(4)]  # noqa: E731
    records = [_drawn(i, name, draw(p), selection_predictions=draw(p))
               for i in range(3000) for name, p in truth.items()]
    worst = next(r for r in summarize(records, config)["rows"] if r["attack"] == "worst-case")
    assert worst["expected_accuracy"] == pytest.approx(0.5, abs=0.02)
    scored_on_themselves = sum(min(sum(r["predictions"]) for r in records[4 * i:4 * i + 4]) / 4
                               for i in range(3000)) / 3000
    assert scored_on_themselves < 0.4


def test_a_cascaded_worst_case_equals_the_uncascaded_one():
    """Skipping the samples an earlier attack broke in every selection draw changes no pick: the
    skipped candidates copy the breaking record, and ties at zero go to the earliest."""
    import random

    rng = random.Random(1)
    attacks = [AttackConfig("clean", kind="clean"), AttackConfig("transfer", kind="transfer"),
               AttackConfig("pgd"), AttackConfig("pgd-long")]
    draw = lambda p: [1 if rng.random() < p else 0 for _ in range(3)]  # noqa: E731
    plain = {(i, "d", a.name): _drawn(i, a.name, draw(p), selection_predictions=draw(p))
             for i in range(400) for a, p in zip(attacks, (0.8, 0.4, 0.2, 0.1))}
    cascaded_config = ExperimentConfig(defenses=[DefenseConfig("d", kind="none")], attacks=attacks,
                                       evaluation={"draws": 3, "selection_draws": 3, "cascade": True})
    cascaded: dict = {}
    for i in range(400):
        for attack in attacks:
            breaking = breaking_record(cascaded_config, "d", attack, i, cascaded)
            key = (i, "d", attack.name)
            cascaded[key] = plain[key] if breaking is None else skipped_record(breaking, attack.name)
    assert any("skipped_by" in r for r in cascaded.values())
    plain_config = ExperimentConfig(defenses=cascaded_config.defenses, attacks=attacks,
                                    evaluation={"draws": 3, "selection_draws": 3})
    rows = [{r["attack"]: r for r in summarize(list(records.values()), c)["rows"]}["worst-case"]
            for records, c in ((plain, plain_config), (cascaded, cascaded_config))]
    for scoring in ("expected", "worst", "majority"):
        assert rows[0][f"{scoring}_accuracy"] == rows[1][f"{scoring}_accuracy"]


def test_a_stale_cascade_skip_is_refused():
    """A skipped record whose breaking record is gone, or no longer breaks the sample, is refused."""
    attacks = [AttackConfig("clean", kind="clean"), AttackConfig("pgd")]
    config = ExperimentConfig(defenses=[DefenseConfig("d", kind="none")], attacks=attacks,
                              evaluation={"draws": 2, "selection_draws": 2, "cascade": True})
    clean = _drawn(0, "clean", [0, 0], selection_predictions=[0, 0])
    skipped = skipped_record(clean, "pgd")
    assert summarize([clean, skipped], config)["rows"]
    with pytest.raises(ValueError, match="whose record is missing"):
        summarize([skipped], config)
    with pytest.raises(ValueError, match="no longer breaks"):
        summarize([{**clean, "selection_predictions": [1, 0]}, skipped], config)


def test_three_scorings_of_scoring_draws():
    """Expected = mean fraction of right draws; worst-of-R = right in every draw; majority-of-R =
    the most predicted class is right (a tie is wrong); an attack's broken verdict is wrong."""
    config = ExperimentConfig(defenses=[DefenseConfig("d", kind="none")],
                              attacks=[AttackConfig("clean", kind="clean"), AttackConfig("pgd")],
                              evaluation={"draws": 4})
    records = [_drawn(0, "clean", [1, 1, 1, 1]), _drawn(1, "clean", [1, 1, 1, 0]),
               _drawn(2, "clean", [1, 1, 0, 0]), _drawn(3, "clean", [0, 2, 1, 1]),
               *(_drawn(i, "pgd", [1, 1, 1, 1]) for i in range(3)),
               _drawn(3, "pgd", [1, 1, 1, 1], verdict="broken")]
    summary = summarize(records, config)
    rows = {r["attack"]: r for r in summary["rows"]}
    clean = rows["clean"]
    assert clean["draws"] == 4 and clean["scoring"] == "expected"
    assert clean["expected_accuracy"] == pytest.approx((4 + 3 + 2 + 2) / 16)
    assert clean["worst_accuracy"] == 0.25 and clean["majority_accuracy"] == 0.75
    assert clean["accuracy"] == clean["expected_accuracy"]
    assert clean["expected_ci_low"] < clean["expected_accuracy"] < clean["expected_ci_high"]
    assert rows["pgd"]["worst_accuracy"] == 0.75 and rows["pgd"]["expected_accuracy"] == 0.75
    # records without selection draws: the first half of the draws picks, the second half scores
    worst = rows["worst-case"]  # picks: pgd (tie above 0 -> later), pgd, pgd, clean (tie at 0 -> earlier)
    assert worst["expected_accuracy"] == pytest.approx((1 + 1 + 1 + 1) / 4)
    assert worst["draws"] == 2 and worst["selection_draws"] == 2
    resubmission = rows["resubmission"]  # right in every draw of clean and pgd: sample 0 only
    assert resubmission["expected_accuracy"] == 0.25 and resubmission["worst_accuracy"] == 0.25
    headline = ExperimentConfig(defenses=config.defenses, attacks=config.attacks,
                                evaluation={"draws": 4, "headline": "worst"})
    assert summarize(records, headline)["rows"][0]["accuracy"] == 0.25
    table = format_table(summary)
    assert "worst-of-R" in table and "majority-of-R" in table and "25.0 [" in table


@pytest.mark.parametrize("changes, message", [
    ({"batch_size": 0}, "batch_size"), ({"data": {"limit": 0}}, "data.limit"),
    ({"defenses": [{"name": "d", "purifier": {"frozen_noise": True}}]}, "frozen_noise is a threat model"),
    ({"defenses": [{"name": "d", "kind": "none", "diffusion": "m"}]}, "only a purifier uses one"),
    ({"defenses": [{"name": "d", "diffusion": ""}]}, "diffusion must name a model")])
def test_bad_run_settings_are_refused(changes, message):
    values = {"defenses": [{"name": "d", "kind": "none"}], "attacks": [{"name": "c", "kind": "clean"}], **changes}
    with pytest.raises(ValueError, match=message):
        from_dict(ExperimentConfig, values)


@pytest.mark.parametrize("evaluation, message", [({"draws": 0}, "draws"), ({"headline": "best"}, "headline")])
def test_bad_scoring_settings_are_refused(evaluation, message):
    with pytest.raises(ValueError, match=message):
        ExperimentConfig(defenses=[DefenseConfig("d", kind="none")], attacks=[{"name": "c", "kind": "clean"}],
                         evaluation=evaluation)


@pytest.mark.parametrize("attacks, message", [
    ([{"name": "p", "start_from": "t"}, {"name": "t", "kind": "transfer"}], "must name an attack listed before"),
    ([{"name": "t", "kind": "transfer"}, {"name": "p", "start_from": "t", "eps": "4/255"}], "another threat model"),
    ([{"name": "t", "kind": "transfer"}, {"name": "p", "kind": "autoattack", "start_from": "t"}], "PGD-based"),
])
def test_bad_warm_starts_are_refused(attacks, message):
    with pytest.raises(ValueError, match=message):
        ExperimentConfig(defenses=[DefenseConfig("d", kind="none")], attacks=attacks)


# ----------------------------------------------------------------------------- records

def _record(index: int, defense: str = "d", attack: str = "a") -> dict:
    return {"index": index, "defense": defense, "attack": attack, "label": 1, "prediction": 1,
            "correct": True}


def test_torn_last_line_is_ignored_and_truncated(tmp_path):
    path = tmp_path / "results.jsonl"
    with RecordWriter(path) as writer:
        writer.write([_record(0), _record(1)])
    complete_size = path.stat().st_size
    with open(path, "ab") as handle:
        handle.write(b'{"attack": "a", "correct": tr')  # killed mid-write: no newline
    assert read_records(path) == [_record(0), _record(1)]

    with RecordWriter(path) as writer:  # reopening cuts the torn tail off
        assert path.stat().st_size == complete_size
        writer.write([_record(2)])
    assert read_records(path) == [_record(0), _record(1), _record(2)]
    assert all(json.loads(line) for line in path.read_text().splitlines())

    with open(path, "ab") as handle:  # a complete but corrupt last line is dropped too
        handle.write(b"not json\n")
    assert len(read_records(path)) == 3
    RecordWriter(path).close()
    assert len(path.read_text().splitlines()) == 3
    assert read_records(tmp_path / "missing.jsonl") == []


def test_write_sorted_is_canonical(tmp_path):
    records = [_record(i, d, a) for i in (10, 2, 9) for d in ("y", "x") for a in ("b", "a")]
    shuffled = [records[i] for i in np.random.default_rng(0).permutation(len(records))]
    reordered_keys = [dict(reversed(list(r.items()))) for r in shuffled]
    write_sorted(records, tmp_path / "one.jsonl")
    write_sorted(reordered_keys, tmp_path / "two.jsonl")
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
    keys = [(r["index"], r["defense"], r["attack"]) for r in read_records(tmp_path / "one.jsonl")]
    assert keys == sorted(keys) and keys[0] == (2, "x", "a") and keys[-1][0] == 10  # numeric order
    assert not list(tmp_path.glob("*.tmp"))


# ----------------------------------------------------------------------------- configs

# Certification configs (``*-certify*.yaml``) have their own schema, checked in test_certification.
SHIPPED_CONFIGS = sorted(path for path in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
                         if "-certify" not in path.stem)


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda path: path.stem)
def test_shipped_configs_are_valid_and_name_known_models(path):
    """Every experiment under configs/ parses and names registered classifiers, RobustBench zoo
    models (or files)."""
    from distpure.models.classifiers import CLASSIFIERS, ROBUSTBENCH_PREFIX

    config = load_experiment(path)
    assert config.name == path.stem
    names = [config.models.victim, *(d.classifier for d in config.defenses if d.kind == "classifier")]
    assert all(name in CLASSIFIERS or name.startswith(ROBUSTBENCH_PREFIX) or Path(name).suffix
               for name in names), names


TRAINING_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "training").glob("*.yaml"))


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda path: path.stem)
def test_shipped_training_configs_are_valid(path):
    """Every training run under configs/training/ parses as the trainer it is for (a classifier's
    names an ``arch``), and one that starts from trained weights names registered models."""
    from distpure.config import from_dict, load_yaml
    from distpure.models.classifiers import CLASSIFIERS
    from distpure.models.diffusion_loader import DIFFUSION_MODELS
    from distpure.training.classifier import ClassifierTrainingConfig
    from distpure.training.diffusion import DiffusionTrainingConfig

    values = load_yaml(path)
    if "arch" in values:
        config = from_dict(ClassifierTrainingConfig, values)
        assert config.arch in CLASSIFIERS and (config.init is None or config.init in CLASSIFIERS)
        assert config.diffusion in DIFFUSION_MODELS
    else:
        config = from_dict(DiffusionTrainingConfig, values)
        assert config.init_from is None or config.init_from in DIFFUSION_MODELS
        assert config.steps > config.warmup_steps
    assert isinstance(config.learning_rate, float)


@pytest.mark.parametrize("change, culprit", [
    ({"batchsize": 4}, "batchsize"),
    ({"data": {"dataset": "cifar10", "limt": 3}}, "limt"),
    ({"defenses": [{"name": "x", "kind": "none", "tstar": 3}]}, "tstar"),
    ({"defenses": [{"name": "x", "kind": "magic"}]}, "magic"),
    ({"attacks": [{"name": "cw", "kind": "carlini"}]}, "carlini"),
    ({"attacks": [{"name": "pgd", "kind": "pgd"}, {"name": "pgd", "kind": "bpda"}]}, "pgd"),
    ({"defenses": [{"name": "twin", "kind": "none"}, {"name": "twin"}]}, "twin"),
])
def test_invalid_config_names_the_culprit(tmp_path, assets, change, culprit):
    path = write_yaml(tmp_path / "bad.yaml", experiment(assets, **change))
    with pytest.raises(ValueError, match=culprit):
        load_experiment(path)
    assert main(["evaluate", str(path), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_duplicate_names_are_refused(assets, tmp_path):
    path = write_yaml(tmp_path / "dup.yaml", experiment(assets, attacks=ATTACKS + [ATTACKS[0]]))
    with pytest.raises(ValueError, match="unique"):
        load_experiment(path)


def test_run_dir_with_another_config_is_refused(assets, reference_run, tmp_path, capsys):
    stored = (reference_run / "config.yaml").read_text()
    other = write_yaml(tmp_path / "other.yaml", experiment(assets, seed=1))
    with pytest.raises(ValueError, match="different experiment"):
        run_experiment(load_experiment(other), reference_run, show_progress=False)
    assert main(["evaluate", str(other), "--out", str(reference_run)]) == 2
    assert "different experiment" in capsys.readouterr().err
    assert (reference_run / "config.yaml").read_text() == stored


def test_a_run_grows_by_attacks_appended_at_the_end(assets, reference_run, tmp_path):
    """Attacks appended after the stored ones extend a run, every earlier record kept as it
    was; an attack inserted before a stored one would change the cascade's subsets: refused."""
    run_dir = tmp_path / "grown"
    shutil.copytree(reference_run, run_dir)
    extra = {"name": "bpda", "kind": "bpda", "eps": "8/255", "steps": 1, "start_from": "transfer"}
    grown = load_experiment(write_yaml(tmp_path / "grown.yaml", experiment(assets, attacks=ATTACKS + [extra])))
    resolved = json.loads((run_dir / "resolved.json").read_text())
    resolved["settings"]["attacks"]["bpda"] = {"iterations": 1, "eot_draws": 1}
    claim_run_dir(RunDirectory(run_dir), grown, resolved)  # as a session killed right after it
    assert not RunDirectory(run_dir).finished  # unfinished until the new attack's records exist
    assert "Partial run" in write_report(run_dir).read_text()
    run_experiment(grown, run_dir, show_progress=False)
    assert RunDirectory(run_dir).finished
    records = read_records(run_dir / "results.jsonl")
    assert [r for r in records if r["attack"] != "bpda"] == read_records(reference_run / "results.jsonl")
    assert len([r for r in records if r["attack"] == "bpda"]) == 2 * IMAGES_PER_CLASS * len(DEFENSES)
    assert load_experiment(run_dir / "config.yaml").attacks[-1].name == "bpda"
    assert "bpda" in json.loads((run_dir / "resolved.json").read_text())["settings"]["attacks"]
    assert "bpda" in {row["attack"] for row in json.loads((run_dir / "summary.json").read_text())["rows"]}

    inserted = experiment(assets, attacks=[*ATTACKS[:2], extra | {"name": "early"}, ATTACKS[2]])
    with pytest.raises(ValueError, match="different experiment"):
        run_experiment(load_experiment(write_yaml(tmp_path / "inserted.yaml", inserted)), run_dir,
                       show_progress=False)


def test_a_run_grows_by_defences_appended_at_the_end(assets, tmp_path):
    """A defence appended after the stored ones extends a run, and may join an attack restricted
    to some defences: every earlier record is kept as it was, and the new defence's records equal
    those of a run that had it from the start. Adding a defence to an attack's list that was run
    without it, or inserting a defence before a stored one, is refused."""
    extra = {"name": "purified-late", "kind": "purifier", "purifier": {"t_star": 20, "num_steps": 3}}

    def restricted(defenses: list[dict], pgd_defenses: list[str], name: str):
        attacks = [*ATTACKS[:2], {**ATTACKS[2], "defenses": pgd_defenses}]
        return load_experiment(write_yaml(tmp_path / f"{name}.yaml",
                                          experiment(assets, defenses=defenses, attacks=attacks)))

    run_dir, fresh = tmp_path / "grown", tmp_path / "fresh"
    run_experiment(restricted(DEFENSES, ["purified"], "stored"), run_dir, show_progress=False)
    first = read_records(run_dir / "results.jsonl")
    grown = restricted([*DEFENSES, extra], ["purified", "purified-late"], "grown")
    run_experiment(grown, run_dir, show_progress=False)
    run_experiment(grown, fresh, show_progress=False)
    records = read_records(run_dir / "results.jsonl")
    assert [r for r in records if r["defense"] != "purified-late"] == first
    assert records == read_records(fresh / "results.jsonl")
    assert {r["attack"] for r in records if r["defense"] == "purified-late"} == {"clean", "transfer", "pgd"}
    assert "purified-late" in json.loads((run_dir / "resolved.json").read_text())["settings"]["defenses"]

    for name, defenses, pgd_defenses in (("widened", [*DEFENSES, extra], ["none", "purified", "purified-late"]),
                                         ("inserted", [extra, *DEFENSES], ["purified", "purified-late"])):
        with pytest.raises(ValueError, match="different experiment"):
            run_experiment(restricted(defenses, pgd_defenses, name), run_dir, show_progress=False)


def test_an_appended_continuation_starts_from_the_kept_examples(assets, reference_run, tmp_path):
    """An attack appended to a finished run that continues an earlier one reads that attack's
    kept examples instead of recrafting it (no new trace of it), and its records equal those of
    a run that had it from the start."""
    longer = {"name": "pgd-long", "kind": "pgd", "eps": "8/255", "steps": 2, "start_from": "pgd"}
    config_path = write_yaml(tmp_path / "longer.yaml", experiment(assets, attacks=ATTACKS + [longer]))
    kept = sorted((reference_run / "crafted").glob("*/batch*.safetensors"))
    assert {path.parent.name for path in kept} == {"none__pgd", "purified__pgd"}  # not clean, not transfer
    run_dir = tmp_path / "grown"
    shutil.copytree(reference_run, run_dir)
    traced = lambda root, attack: [t for t in read_records(root / "traces.jsonl") if t["attack"] == attack]  # noqa: E731
    run_experiment(load_experiment(config_path), run_dir, show_progress=False)
    assert traced(run_dir, "pgd") == traced(reference_run, "pgd")  # read back, not recrafted
    whole = tmp_path / "whole"
    run_experiment(load_experiment(config_path), whole, show_progress=False)
    assert read_records(run_dir / "results.jsonl") == read_records(whole / "results.jsonl")
    assert [t for t in read_records(whole / "traces.jsonl") if t["attack"] == "pgd-long"] == traced(run_dir, "pgd-long")
    assert all(path.read_bytes() == (run_dir / path.relative_to(reference_run)).read_bytes() for path in kept)
    continued = [r for r in read_records(run_dir / "results.jsonl") if r["attack"] == "pgd-long" and "skipped_by" not in r]
    assert continued and all(len(r["start_predictions"]) == len(r["predictions"]) for r in continued)
    assert not any("start_predictions" in r for r in read_records(run_dir / "results.jsonl") if r["attack"] == "pgd")
    # a kept file cut short by a killed session is recrafted, with the same records
    broken = tmp_path / "broken"
    shutil.copytree(reference_run, broken)
    cut = broken / kept[0].relative_to(reference_run)
    cut.write_bytes(cut.read_bytes()[:40])
    run_experiment(load_experiment(config_path), broken, show_progress=False)
    assert read_records(broken / "results.jsonl") == read_records(whole / "results.jsonl")
    assert len(traced(broken, "pgd")) == len(traced(reference_run, "pgd")) + 1
    assert cut.read_bytes() == kept[0].read_bytes()  # kept again, whole


def test_time_summary_by_hand():
    """Per pair: seconds, samples attacked, seconds per attacked sample; a unit timed twice (redone
    after a resume) counts once; without the cascade each pair's units would attack all samples."""
    from distpure.evaluation.timing import time_summary, unit_timing

    kept, skipped = {"attack": "a"}, {"attack": "a", "skipped_by": "t"}
    timings = [unit_timing("d", "a", 0, 99.0, [kept] * 4),  # redone, after its records were deleted:
               unit_timing("d", "a", 0, 8.0, [kept, kept, skipped, skipped]),
               unit_timing("d", "a", 1, 0.5, [skipped] * 4),
               unit_timing("d", "clean", 0, 1.0, [kept] * 4)]
    summary = time_summary(timings)
    pairs = {p["attack"]: p for p in summary["pairs"]}
    assert summary["units"] == 3 and summary["seconds"] == pytest.approx(9.5)
    assert (pairs["a"]["attacked"], pairs["a"]["samples"], pairs["a"]["units"]) == (2, 8, 2)
    assert pairs["a"]["seconds_per_attacked_sample"] == pytest.approx(8.5 / 2)
    assert summary["seconds_without_cascade"] == pytest.approx(8.5 / 2 * 8 + 1.0)
    assert time_summary([unit_timing("d", "a", 0, 0.1, [skipped])])["pairs"][0]["seconds_per_attacked_sample"] is None


def test_paired_difference_intervals():
    """The normal interval of the mean difference; no width without scatter is replaced by
    Wilson's bound on what could still differ; one sample says nothing."""
    result = paired_difference([0.5, -0.25, 1.0, 0.0])  # mean 0.3125, sd 0.5543, se 0.27717
    assert result.mean == pytest.approx(0.3125) and result.total == 4
    assert (result.low, result.high) == pytest.approx((0.3125 - 0.543243, 0.3125 + 0.543243), rel=1e-5)
    flat = paired_difference([0.0] * 32)
    assert flat.mean == 0.0 and flat.high == pytest.approx(2 * 3.841459 / (32 + 3.841459))
    assert flat.low == pytest.approx(-flat.high)
    assert (paired_difference([1.0]).low, paired_difference([1.0]).high) == (-1.0, 1.0)
    assert paired_difference([]).total == 0


def test_paired_differences_against_the_baseline(assets, reference_run, tmp_path):
    """Each defence minus the baseline, per sample on the same images, for clean and the worst
    case; naming a baseline changes no record, so a finished run takes one on resume."""
    run_dir = tmp_path / "compared"
    shutil.copytree(reference_run, run_dir)
    config = load_experiment(write_yaml(tmp_path / "compared.yaml", experiment(assets, baseline="none")))
    summary = run_experiment(config, run_dir, show_progress=False)
    assert read_records(run_dir / "results.jsonl") == read_records(reference_run / "results.jsonl")
    records = read_records(run_dir / "results.jsonl")

    def expected(defense: str, attack: str) -> dict[int, float]:
        return {r["index"]: sum(p == r["label"] for p in r["predictions"]) / len(r["predictions"])
                for r in records if (r["defense"], r["attack"]) == (defense, attack)}

    by_column = {c["column"]: c for c in summary["comparisons"]}
    assert set(by_column) == {"clean", "worst-case"} and by_column["clean"]["defense"] == "purified"
    purified, none = expected("purified", "clean"), expected("none", "clean")
    differences = [purified[i] - none[i] for i in none]
    assert by_column["clean"]["total"] == len(differences) == 2 * IMAGES_PER_CLASS
    assert by_column["clean"]["expected"]["mean"] == pytest.approx(sum(differences) / len(differences))
    worst = {i: min(expected("purified", a)[i] for a in ("clean", "transfer", "pgd"))
             - min(expected("none", a)[i] for a in ("clean", "transfer", "pgd")) for i in none}
    assert by_column["worst-case"]["expected"]["mean"] == pytest.approx(sum(worst.values()) / len(worst))
    mean = sum(worst.values()) / len(worst)
    half = 1.959964 * (sum((d - mean) ** 2 for d in worst.values()) / (len(worst) - 1) / len(worst)) ** 0.5
    if half > 0:
        assert by_column["worst-case"]["expected"]["low"] == pytest.approx(max(-1, mean - half))
        assert by_column["worst-case"]["expected"]["high"] == pytest.approx(min(1, mean + half))
    for scoring, right in (("worst", lambda p, y: all(q == y for q in p)),
                           ("majority", lambda p, y: Counter(p).most_common(1)[0][0] == y
                            and list(Counter(p).values()).count(max(Counter(p).values())) == 1)):
        clean = {d: {r["index"]: float(right(r["predictions"], r["label"])) for r in records
                     if (r["defense"], r["attack"]) == (d, "clean")} for d in ("purified", "none")}
        assert by_column["clean"][scoring]["mean"] == pytest.approx(
            sum(clean["purified"][i] - clean["none"][i] for i in none) / len(none))
    assert "### Paired differences against none" in write_report(run_dir).read_text()
    with pytest.raises(ValueError, match="baseline"):
        load_experiment(write_yaml(tmp_path / "bad.yaml", experiment(assets, baseline="nobody")))


def test_a_run_from_before_a_new_setting_resumes(assets, config_path, reference_run, tmp_path):
    """A setting added since (stored config.yaml without it) takes its default: no difference."""
    run_dir = tmp_path / "older"
    shutil.copytree(reference_run, run_dir)
    (run_dir / "timings.jsonl").unlink()
    assert summary_json(run_dir)["time"] is None and "### Time" not in write_report(run_dir).read_text()
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    for attack in stored["attacks"]:
        del attack["eot_batch"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(stored))
    resolved = json.loads((run_dir / "resolved.json").read_text())  # and resolved.json without them
    del resolved["settings"]["evaluation"]["cascade"]
    del resolved["settings"]["defenses"]["purified"]["purifier"]["sampler"]
    del resolved["settings"]["defenses"]["purified"]["diffusion"]  # purifiers ran models.diffusion
    (run_dir / "resolved.json").write_text(json.dumps(resolved))
    run_experiment(load_experiment(config_path), run_dir, show_progress=False)
    assert "eot_batch" in (run_dir / "config.yaml").read_text()
    assert "cascade" in (run_dir / "resolved.json").read_text()


def test_each_purifier_may_run_its_own_diffusion_model(assets, reference_run, tmp_path):
    """``diffusion`` on a defence compares two models on the same images in one run: each
    defence is built on its own model, the resolved settings name it, and a resumed run with
    another model for a defence is refused."""
    from distpure.evaluation.runner import build_defenses

    other = tmp_path / "other-diffusion"
    shutil.copytree(assets.diffusion, other)
    defenses = [*DEFENSES, {**DEFENSES[1], "name": "other", "diffusion": str(other)}]
    config = load_experiment(write_yaml(tmp_path / "two.yaml", experiment(assets, defenses=defenses)))
    built = build_defenses(config, torch.device("cpu"))
    assert built["purified"].purifier.diffusion is not built["other"].purifier.diffusion
    run_dir = tmp_path / "two"
    run_experiment(config, run_dir, show_progress=False)
    settings = json.loads((run_dir / "resolved.json").read_text())["settings"]["defenses"]
    assert (settings["purified"]["diffusion"], settings["other"]["diffusion"]) == (str(assets.diffusion), str(other))
    assert settings["none"]["diffusion"] is None
    records = read_records(run_dir / "results.jsonl")
    assert [r for r in records if r["defense"] != "other"] == read_records(reference_run / "results.jsonl")
    report = write_report(run_dir).read_text()
    assert f"diffusion `{assets.diffusion}`, `{other}`" in report and f"diffusion={other}" in report
    csv_rows = list(csv.DictReader(open(run_dir / "results.csv", encoding="utf-8")))
    assert {(r["defense"], r["diffusion"]) for r in csv_rows} == {
        ("none", ""), ("purified", str(assets.diffusion)), ("other", str(other))}

    missing = [*DEFENSES, {**DEFENSES[1], "name": "lost", "diffusion": str(tmp_path / "no-such-model")}]
    with pytest.raises(ValueError, match="diffusion model of defence.s. lost: .*neither a registered model"):
        build_defenses(load_experiment(write_yaml(tmp_path / "lost.yaml", experiment(assets, defenses=missing))),
                       torch.device("cpu"))
    swapped = [*DEFENSES, {**DEFENSES[1], "name": "other", "diffusion": str(assets.diffusion)}]
    with pytest.raises(ValueError, match="different experiment"):
        run_experiment(load_experiment(write_yaml(tmp_path / "swapped.yaml", experiment(assets, defenses=swapped))),
                       run_dir, show_progress=False)


def test_resuming_with_other_resolved_settings_is_refused(assets, config_path, reference_run, tmp_path,
                                                          monkeypatch):
    """config.yaml holds only overrides: a changed default would silently mix two defences."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(reference_run, run_dir)
    resolved = json.loads((run_dir / "resolved.json").read_text())
    assert resolved["settings"]["defenses"]["purified"]["purifier"]["t_star"] == 20
    assert resolved["settings"]["defenses"]["purified"]["purifier"]["victim_scale"] == 10.0
    assert resolved["distpure"] and resolved["settings"]["evaluation"] == {"draws": DRAWS, "selection_draws": 16,
                                                                     "headline": "expected", "cascade": False}
    from distpure.defenses import recommended

    changed = dict(recommended.RECOMMENDED["cifar10"], purifier=PurifierConfig(t_star=75, num_steps=10,
                                                                               victim_scale=7.0))
    monkeypatch.setitem(recommended.RECOMMENDED, "cifar10", changed)
    with pytest.raises(ValueError, match=r"victim_scale: 10\.0 -> 7\.0"):
        run_experiment(load_experiment(config_path), run_dir, show_progress=False)


def test_autoattack_warnings_reach_the_log_and_the_report(assets, tmp_path, caplog):
    """AutoAttack's check that the defence is randomized (standard version) is kept, not muted."""
    attacks = [{"name": "aa", "kind": "autoattack", "steps": 1, "attacks_to_run": ["apgd-ce"]}]
    values = experiment(assets, defenses=[DEFENSES[1]], attacks=attacks,
                        data={"dataset": "cifar10", "root": str(assets.data), "limit": 4})
    run_dir = tmp_path / "aa"
    with caplog.at_level("WARNING", logger="distpure"):
        run_experiment(load_experiment(write_yaml(tmp_path / "aa.yaml", values)), run_dir, show_progress=False)
    stored = read_records(run_dir / "warnings.jsonl")
    assert stored and all(w["defense"] == "purified" and w["attack"] == "aa" for w in stored)
    assert any("randomized defense" in w["message"] for w in stored)
    assert "randomized defense" in caplog.text
    text = write_report(run_dir).read_text()
    assert "### Warnings from the attacks" in text and "purified / aa: it seems to be a randomized" in text


def test_transfer_examples_are_keyed_by_the_model_they_were_crafted_on(assets, tmp_path):
    """A robust classifier defence listed first must not hand its transfer examples to the
    defences behind the experiment's victim."""
    from distpure.models.weights import save_state_dict

    plugin = importlib.import_module(PLUGIN)
    save_state_dict(plugin.DarkCNN(), tmp_path / "other.safetensors")
    attacks = [{"name": "transfer", "kind": "transfer", "eps": "8/255", "steps": 2}]
    robust = {"name": "robust", "kind": "classifier", "classifier": str(tmp_path / "other.safetensors"),
              "classifier_arch": f"{PLUGIN}:DarkCNN"}
    runs = {}
    for name, defenses in (("both", [robust, DEFENSES[0]]), ("alone", [DEFENSES[0]])):
        config = load_experiment(write_yaml(tmp_path / f"{name}.yaml",
                                            experiment(assets, defenses=defenses, attacks=attacks)))
        run_experiment(config, tmp_path / name, show_progress=False)
        runs[name] = {r["index"]: r["predictions"] for r in read_records(tmp_path / name / "results.jsonl")
                      if r["defense"] == "none"}
    assert runs["both"] == runs["alone"]
    adversarial = {name: load_file(str(tmp_path / name / "examples" / "none__transfer.safetensors"))["adversarial"]
                   for name in runs}
    assert torch.equal(adversarial["both"], adversarial["alone"])


def test_cascade_sources_are_the_earlier_attacks_of_the_group():
    """clean and the earlier attacks of the same (norm, ε, noise) group, in config order."""
    attacks = [AttackConfig("transfer", kind="transfer"), AttackConfig("clean", kind="clean"),
               AttackConfig("l2", norm="l2", eps=0.5), AttackConfig("bpda", kind="bpda"),
               AttackConfig("frozen", frozen_noise=True), AttackConfig("pgd")]
    config = ExperimentConfig(defenses=[DefenseConfig("d", kind="none")], attacks=attacks,
                              evaluation={"cascade": True})
    sources = {a.name: [s.name for s in cascade_sources(config, a)] for a in attacks}
    assert sources == {"transfer": [], "clean": [], "l2": ["clean"], "bpda": ["transfer", "clean"],
                       "frozen": ["clean"], "pgd": ["transfer", "clean", "bpda"]}
    config.evaluation.cascade = False
    assert all(cascade_sources(config, a) == [] for a in attacks)


def test_cascade_skips_only_what_an_earlier_attack_broke_in_every_selection_draw():
    """Broken = every one of the attacker's selection draws wrong: the scoring draws decide
    nothing (sample 3: all scoring draws wrong, one selection draw right, attacked again; sample
    4: the reverse, skipped), and a sample wrong in some draws is attacked again."""
    attacks = [AttackConfig("clean", kind="clean"), AttackConfig("transfer", kind="transfer"), AttackConfig("pgd")]
    drawn = lambda i, attack, selection, scoring=(1, 1): _drawn(  # noqa: E731
        i, attack, list(scoring), selection_predictions=list(selection))
    records = {(0, "d", "clean"): drawn(0, "clean", [1, 1]), (1, "d", "clean"): drawn(1, "clean", [0, 0]),
               (0, "d", "transfer"): drawn(0, "transfer", [1, 0]),
               (2, "d", "clean"): drawn(2, "clean", [1, 1]), (2, "d", "transfer"): drawn(2, "transfer", [1, 1]),
               (3, "d", "clean"): drawn(3, "clean", [1, 0], (0, 0)),
               (4, "d", "clean"): drawn(4, "clean", [0, 0], (1, 1))}
    config = ExperimentConfig(defenses=[DefenseConfig("d", kind="none")], attacks=attacks,
                              evaluation={"cascade": True, "draws": 2, "selection_draws": 2})
    breaking = [breaking_record(config, "d", attacks[2], i, records) for i in range(5)]
    assert [None if b is None else b["attack"] for b in breaking] == [None, "clean", None, None, "clean"]
    skipped = skipped_record(skipped_record(records[1, "d", "clean"], "transfer"), "pgd")
    assert skipped["skipped_by"] == "clean" and skipped["attack"] == "pgd" and skipped["predictions"] == [1, 1]


def test_a_cascaded_run_attacks_only_unbroken_samples_and_resumes_the_same(assets, tmp_path):
    """Skipped records copy the breaking attack's draws; the adaptive attack crafts only the
    rest (its trace counts them); the summary says what was saved; and recrafting after the
    records of the last attack are lost gives the same records (the cascade reads records)."""
    values = experiment(assets, evaluation={"draws": DRAWS, "cascade": True})
    config = load_experiment(write_yaml(tmp_path / "cascade.yaml", values))
    run_dir = tmp_path / "cascade"
    summary = run_experiment(config, run_dir, show_progress=False)
    records = read_records(run_dir / "results.jsonl")
    assert len(records) == TOTAL_RECORDS
    by_key = {(r["index"], r["defense"], r["attack"]): r for r in records}
    skipped = [r for r in records if "skipped_by" in r]
    assert skipped and all(r["attack"] != "clean" for r in skipped)
    for record in skipped:
        origin = by_key[record["index"], record["defense"], record["skipped_by"]]
        assert "skipped_by" not in origin and record["predictions"] == origin["predictions"]
        assert all(p != record["label"] for p in origin["predictions"])  # broken in every draw
    for record in records:  # nothing unbroken by its sources was skipped
        sources = [by_key[record["index"], record["defense"], a] for a in ("clean", "transfer")[
            : ["clean", "transfer", "pgd"].index(record["attack"])]]
        broken_before = any(all(p != s["label"] for p in s["predictions"]) for s in sources)
        assert ("skipped_by" in record) == broken_before
    traces = read_records(run_dir / "traces.jsonl")
    attacked = {d: sum(1 for r in records if r["defense"] == d and r["attack"] == "pgd" and "skipped_by" not in r)
                for d in ("none", "purified")}
    assert {d: sum(t["n"] for t in traces if t["owner"] == d and t["attack"] == "pgd") for d in attacked} == attacked
    assert summary["cascade"]["skipped"] == len(skipped) and 0 < summary["cascade"]["saved_fraction"] < 1
    assert "cascade: skipped" in format_table(summary)
    report = write_report(run_dir).read_text()
    assert "### Cascade" in report and "### Time" in report
    timings = read_records(run_dir / "timings.jsonl")  # one line per unit, its attacked samples counted
    assert len(timings) == 3 * len(DEFENSES) * len(ATTACKS)  # 12 images in batches of 4
    for unit in timings:
        batch = [r for r in records if r["defense"] == unit["defense"] and r["attack"] == unit["attack"]
                 and r["index"] // BATCH_SIZE == unit["batch"]]
        assert (unit["samples"], unit["attacked"]) == (len(batch), sum("skipped_by" not in r for r in batch))
    assert summary_json(run_dir)["time"]["units"] == len(timings)

    kept = [r for r in records if r["attack"] != "pgd"]
    rerun = tmp_path / "rerun"
    rerun.mkdir()
    for name in ("config.yaml", "resolved.json"):
        shutil.copy(run_dir / name, rerun / name)
    write_sorted(kept, rerun / "results.jsonl")
    run_experiment(config, rerun, show_progress=False)
    assert read_records(rerun / "results.jsonl") == records


# ----------------------------------------------------------------------------- runs

def _assert_same_examples(run_dir: Path, reference: Path) -> None:
    """The saved clean / adversarial / purified tensors are bit-identical too (a stronger check
    than predictions: any float drift in the attack or the purifier would show here)."""
    from safetensors.torch import load_file

    names = sorted(p.name for p in (reference / "examples").iterdir())
    assert sorted(p.name for p in (run_dir / "examples").iterdir()) == names
    for name in names:
        ours, theirs = load_file(run_dir / "examples" / name), load_file(reference / "examples" / name)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}: {key} differs"


def _summary_accuracies(run_dir: Path) -> list[tuple]:
    rows = json.loads((run_dir / "summary.json").read_text())["rows"]
    return [(r["defense"], r["attack"], r["correct"], r["total"], r["accuracy"]) for r in rows]


def test_reference_run_is_complete(reference_run):
    records = read_records(reference_run / "results.jsonl")
    assert len(records) == TOTAL_RECORDS
    assert {p for r in records for p in r["predictions"]} == {0, 1}  # the tiny victim is not constant
    purified = [r for r in records if r["defense"] == "purified"]
    assert all(len(r["predictions"]) == DRAWS for r in purified)  # R scoring draws
    assert all(len(r["predictions"]) == 1 for r in records if r["defense"] == "none")  # deterministic
    assert not list(reference_run.glob("results.rank*.jsonl"))
    metadata = json.loads((reference_run / "metadata.json").read_text())
    assert metadata["processes"] == 1 and metadata["seed"] == 0
    sessions = read_records(reference_run / "sessions.jsonl")
    assert len(sessions) == 1 and sessions[0]["hardware"] == metadata["hardware"]
    hardware = metadata["hardware"]  # every figure says what produced it
    assert hardware["precision"] == "auto" and hardware["resolved_precision"] in ("fp32", "bf16")
    assert hardware["resolved_precision"] == ("bf16" if hardware["native_bf16"] else "fp32")
    assert hardware["cpu"] and hardware["device"] == "cpu"
    examples = sorted(p.name for p in (reference_run / "examples").iterdir())
    assert examples == sorted(f"{d['name']}__{a['name']}.safetensors" for d in DEFENSES for a in ATTACKS)


def test_killed_run_resumes_to_identical_results(assets, config_path, reference_run, tmp_path):
    run_dir = tmp_path / "run-b"
    command = [sys.executable, "-m", "distpure", "evaluate", str(config_path), "--out", str(run_dir)]
    env = subprocess_env(assets)
    log = tmp_path / "first.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=output, stderr=output)
        deadline = time.monotonic() + 90
        written = 0
        try:
            while process.poll() is None and time.monotonic() < deadline:
                written = len(read_records(run_dir / "results.jsonl"))
                if 0 < written < TOTAL_RECORDS:
                    process.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.005)
        finally:
            if process.poll() is None and not 0 < written < TOTAL_RECORDS:
                process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, \
        f"the run was not interrupted mid-way (exit {process.returncode}):\n{log.read_text()}"
    partial = read_records(run_dir / "results.jsonl")
    assert 0 < len(partial) < TOTAL_RECORDS
    assert not (run_dir / "summary.json").exists()
    with open(run_dir / "results.jsonl", "ab") as handle:  # as if killed in the middle of a line
        handle.write(b'{"attack": "pgd", "correct": fal')

    resumed = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert (run_dir / "results.jsonl").read_bytes() == (reference_run / "results.jsonl").read_bytes()
    assert _summary_accuracies(run_dir) == _summary_accuracies(reference_run)
    _assert_same_examples(run_dir, reference_run)
    assert "purified" in resumed.stdout  # the table printed at the end


def test_a_session_killed_mid_attack_resumes_that_attack(assets, tmp_path, monkeypatch):
    """A session that ends between two iterations of an attack leaves its progress in the run
    directory; the next session resumes the attack at that iteration. One that ends while the
    crafted examples are scored keeps the finished attack, which the next replays without
    iterating. Both make the records of an uninterrupted run, and the time before the kill
    counts in the unit's; the progress file goes once the unit's records are written."""
    attacks = ATTACKS[:2] + [{**ATTACKS[2], "steps": 4, "eot": 2}]
    config = load_experiment(write_yaml(tmp_path / "long.yaml", experiment(assets, attacks=attacks)))
    whole = tmp_path / "whole"
    run_experiment(config, whole, show_progress=False)

    class Killed(Exception):
        pass

    saved, loaded, kill = [], [], {"at save": 6, "when scoring": False}
    save, load, predict = ProgressFile.save, ProgressFile.load, runner_module.predict_draws

    def save_then_kill(self, progress):  # the first batch: 4 iterations on "none", then "purified"
        save(self, progress)
        saved.append((f"{self.path.parent.name}/{self.path.name[:9]}", progress["step"]))
        if len(saved) == kill["at save"]:
            raise Killed

    def noting_load(self):
        progress = load(self)
        loaded.append((f"{self.path.parent.name}/{self.path.name[:9]}", progress and progress["step"]))
        return progress

    def kill_when_scoring(*args):
        if kill["when scoring"]:
            raise Killed
        return predict(*args)

    monkeypatch.setattr(ProgressFile, "save", save_then_kill)
    monkeypatch.setattr(ProgressFile, "load", noting_load)
    monkeypatch.setattr(runner_module, "predict_draws", kill_when_scoring)
    run_dir = tmp_path / "killed"
    with pytest.raises(Killed):
        run_experiment(config, run_dir, show_progress=False)
    first = "purified__pgd/batch0000"
    assert saved[-1] == (first, 2)
    progress_files = list((run_dir / "crafted").rglob("*.progress.pt"))
    assert [p.name for p in progress_files] == ["batch0000.progress.pt"]
    seconds_before = torch.load(progress_files[0], weights_only=True)["seconds"]

    loaded.clear(), saved.clear()
    kill.update({"at save": None, "when scoring": True})
    with pytest.raises(Killed):
        run_experiment(config, run_dir, show_progress=False)
    assert loaded == [(first, 2)] and saved == [(first, 3), (first, 4)]
    assert progress_files[0].is_file()  # crafted, not yet scored: kept

    loaded.clear(), saved.clear()
    kill["when scoring"] = False
    run_experiment(config, run_dir, show_progress=False)
    assert loaded[0] == (first, 4) and not any(name == first for name, _ in saved)  # replayed, no iteration
    unit = [t for t in read_records(run_dir / "timings.jsonl") if (t["defense"], t["attack"], t["batch"]) == ("purified", "pgd", 0)]
    assert len(unit) == 1 and unit[0]["seconds"] >= round(seconds_before, 2) > 0  # the killed sessions' part counts
    assert read_records(run_dir / "results.jsonl") == read_records(whole / "results.jsonl")
    assert RunDirectory(run_dir).read_traces() == RunDirectory(whole).read_traces()
    assert not list((run_dir / "crafted").rglob("*.progress.pt*"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_matches_one_process(assets, config_path, reference_run, tmp_path):
    run_dir = tmp_path / "run-c"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "distpure", "evaluate", str(config_path), "--out", str(run_dir)]
    result = subprocess.run(command, env=subprocess_env(assets), cwd=tmp_path, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (run_dir / "results.jsonl").read_bytes() == (reference_run / "results.jsonl").read_bytes()
    assert _summary_accuracies(run_dir) == _summary_accuracies(reference_run)
    _assert_same_examples(run_dir, reference_run)
    assert json.loads((run_dir / "metadata.json").read_text())["processes"] == 2
    assert not list(run_dir.glob("results.rank*.jsonl"))


# ----------------------------------------------------------------------------- report

def test_a_new_resumptions_records_are_reported_apart(reference_run, tmp_path):
    """Records of another (version, precision) stamp get a table of their own; a run of one stamp
    none. The planted stamp's cells score only its records."""
    assert "### Records by scoring code" not in write_report(reference_run).read_text()
    run_dir = tmp_path / "resumed"
    shutil.copytree(reference_run, run_dir)
    records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    planted = [r for r in records if r["index"] == 0 and r["attack"] == "clean"]
    for record in planted:
        record.update(distpure="9.9.9", precision="fp64")
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = write_report(run_dir).read_text()
    section = text[text.index("### Records by scoring code"):].split("\n#")[0]
    assert "distpure 9.9.9 at fp64" in section
    rows = {line.split(" | ")[0][2:]: line for line in section.splitlines() if " | clean | " in line}
    for record in planted:  # the planted stamp sorts last: its column is the row's last cell
        hits = sum(int(p) == int(record["label"]) for p in record["predictions"]) / len(record["predictions"])
        assert rows[record["defense"]].split(" | ")[-1].startswith(f"{100 * hits:.1f} [")
        assert rows[record["defense"]].endswith("(n = 1) |")


def test_report_of_a_finished_run(assets, reference_run, capsys):
    stale = reference_run / "plots" / "grid_dropped-defence__pgd.png"  # from a row no longer configured
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"")
    path = write_report(reference_run)
    assert not stale.exists()
    assert path == reference_run / "report.md"
    text = path.read_text()
    header = "| attack | " + " | ".join(d["name"] for d in DEFENSES) + " |"
    assert "### L∞ 8/255" in text and header in text
    assert text.index("\n| clean | ") < text.index("\n| transfer | ") < text.index("\n| pgd | ") \
        < text.index("\n| worst case, L∞ 8/255 | ") < text.index("\n| resubmission, L∞ 8/255 | ")
    assert "### Worst case by the attacker's selection draws" in text
    summary = json.loads((reference_run / "summary.json").read_text())
    row = next(r for r in summary["rows"] if (r["defense"], r["attack"]) == ("purified", "clean"))
    cell = " / ".join(f"{100 * row[f'{s}_accuracy']:.1f}" for s in ("expected", "worst", "majority")) + " (90)"
    assert cell in text  # the paper's number in parentheses
    assert "Partial run" not in text and "seed: 0" in text and "samples: 12" in text

    import csv

    with open(reference_run / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(DEFENSES) * (len(ATTACKS) + 2)  # + the worst case and the resubmission row
    resubmission = {r["defense"]: r for r in rows if r["kind"] == "resubmission"}
    for defense in ("none", "purified"):  # right in every draw of every attack: below every other row
        survived = [float(r[f"{s}_accuracy"]) for r in rows if r["defense"] == defense
                    for s in ("expected", "worst", "majority")]
        assert float(resubmission[defense]["expected_accuracy"]) <= min(survived) + 1e-9
    purified = next(r for r in rows if r["defense"] == "purified" and r["attack"] == "pgd")
    assert (purified["t_star"], purified["num_steps"], purified["guidance"]) == ("20", "2", "victim")
    assert float(purified["accuracy"]) == next(
        r["accuracy"] for r in summary["rows"] if (r["defense"], r["attack"]) == ("purified", "pgd"))

    grids = sorted((reference_run / "plots").glob("grid_*.png"))
    assert len(grids) == len(DEFENSES) * len(ATTACKS)
    with Image.open(grids[0]) as image:
        assert image.format == "PNG" and image.width > 100
    assert f"](plots/{grids[0].name})" in text
    assert not list((reference_run / "plots").glob("accuracy_vs_*.png"))  # nothing is swept

    # the trade-off: clean against worst case, each defence with its denoiser calls per image
    resolved = json.loads((reference_run / "resolved.json").read_text())
    assert resolved["cost"] == {"none": {"denoiser_calls": 0}, "purified": {"denoiser_calls": 2}}
    assert "### Trade-off: clean vs worst case, L∞ 8/255 (expected)" in text
    worst_rows = {r["defense"]: r for r in summary["rows"] if r["attack"] == "worst-case"}
    clean_rows = {r["defense"]: r for r in summary["rows"] if r["attack"] == "clean"}
    for defense, calls in (("none", 0), ("purified", 2)):
        assert (f"| {defense} | {100 * clean_rows[defense]['accuracy']:.1f} | "
                f"{100 * worst_rows[defense]['accuracy']:.1f} | {calls} |") in text
    assert (reference_run / "plots" / "pareto_worst-case.png").is_file()

    # at a glance: the three scorings per cell, and the attack with the lowest headline accuracy
    rows_by = {(r["defense"], r["attack"]): r for r in summary["rows"]}
    glance = lambda row: " / ".join(f"{100 * row[f'{s}_accuracy']:.1f}" for s in ("expected", "worst", "majority"))
    strongest = min(("transfer", "pgd"), key=lambda a: rows_by["purified", a]["accuracy"])
    status = summary_json(reference_run)["convergence"].get(f"purified/{strongest}", {}).get("status")
    mark = {"not converged": ", **not converged**", "not judged": ", not judged"}.get(status, "")
    assert (f"| purified | {glance(rows_by['purified', 'clean'])} | {glance(rows_by['purified', 'worst-case'])} | "
            f"{strongest} ({100 * rows_by['purified', strongest]['accuracy']:.1f}){mark} |") in text

    assert "### Convergence" in text and (reference_run / "plots" / "convergence_pgd.png").is_file()
    assert main(["report", str(reference_run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    # one trace per crafted batch: pgd per defence, transfer once, keyed by the victim it ran on
    assert set(data["convergence"]) == {"none/pgd", "purified/pgd", f"victim={assets.victim} [{ARCH}]/transfer"}
    assert data["convergence"]["purified/pgd"]["samples"] == 2 * IMAGES_PER_CLASS
    # every attacked pgd sample is also scored on what PGD had at the start of its last quarter
    attacked = [r for r in read_records(reference_run / "results.jsonl")
                if r["attack"] == "pgd" and "skipped_by" not in r]
    assert attacked and all(len(r["late_predictions"]) == len(r["predictions"]) for r in attacked)
    assert data["convergence"]["purified/pgd"]["basis"] == "scored"
    assert data["convergence"]["purified/pgd"]["scored_samples"] == sum(r["defense"] == "purified" for r in attacked)
    assert data["finished"] and data["samples"] == 12 and len(data["rows"]) == len(rows)
    assert [(r["defense"], r["attack"], r["accuracy"]) for r in data["rows"]] == \
        [(r["defense"], r["attack"], r["accuracy"]) for r in summary["rows"]]
    assert main(["report", str(reference_run)]) == 0
    assert capsys.readouterr().out.strip() == str(path)
    assert main(["report", str(reference_run / "missing")]) == 2


def test_report_of_a_partial_run(reference_run, tmp_path):
    run_dir = tmp_path / "partial"
    run_dir.mkdir()
    shutil.copy(reference_run / "config.yaml", run_dir)
    lines = (reference_run / "results.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "results.jsonl").write_text("".join(lines[:3]))
    shutil.copy(reference_run / "sessions.jsonl", run_dir)  # no metadata.json yet: the session's hardware
    text = write_report(run_dir).read_text()
    assert "Partial run" in text and "–" in text
    session = read_records(run_dir / "sessions.jsonl")[0]
    assert f"- hardware: {describe_hardware(session['hardware'])}; processes: 1" in text
    data = summary_json(run_dir)
    assert not data["finished"] and data["records"] == 3
    json.dumps(data, allow_nan=False)  # NaN accuracies of empty cells became null


def _run_dir_with(records: list[dict], reference_run: Path, run_dir: Path) -> Path:
    """A run directory of the reference experiment holding only ``records`` (a partial run)."""
    run_dir.mkdir()
    shutil.copy(reference_run / "config.yaml", run_dir)
    write_sorted(records, run_dir / "results.jsonl")
    return run_dir


def test_report_of_a_run_stopped_after_its_first_batch(reference_run, tmp_path):
    """The images come in seeded random order, so the first batch already holds both classes
    (in class order it held four of class 0), and the partial report counts each class."""
    records = read_records(reference_run / "results.jsonl")
    assert sorted({r["dataset_index"] for r in records}) == list(range(2 * IMAGES_PER_CLASS))
    first = [r for r in records if r["index"] < BATCH_SIZE]
    run_dir = _run_dir_with(first, reference_run, tmp_path / "first-batch")
    labels = [r["label"] for r in first if (r["defense"], r["attack"]) == ("none", "clean")]
    counts = {label: labels.count(label) for label in (0, 1)}
    assert all(counts.values())
    text = write_report(run_dir).read_text()
    assert "Partial run" in text and "class order" not in text
    assert f"- samples per class (label: count): 0: {counts[0]}, 1: {counts[1]}\n" in text
    assert summary_json(run_dir)["samples_per_class"] == {"0": counts[0], "1": counts[1]}


def test_run_written_in_class_order_is_reported_but_not_resumed(config_path, reference_run, tmp_path):
    """Records from before the order was randomised have no dataset index: the report reads them
    and warns that their partial view follows class order; resuming them is refused."""
    old = [{k: v for k, v in r.items() if k != "dataset_index"}
           for r in read_records(reference_run / "results.jsonl")[:6]]
    run_dir = _run_dir_with(old, reference_run, tmp_path / "old")
    assert "written in class order" in write_report(run_dir).read_text()
    with pytest.raises(ValueError, match="record 0 .*no dataset index"):
        run_experiment(load_experiment(config_path), run_dir, show_progress=False)
    assert len(read_records(run_dir / "results.jsonl")) == len(old)


def test_report_plots_the_swept_settings(assets, tmp_path):
    values = experiment(assets, data={"dataset": "cifar10", "root": str(assets.data), "limit": 4},
                        defenses=[{"name": "t10", "purifier": {"t_star": 10, "num_steps": 2}},
                                  {"name": "t20", "purifier": {"t_star": 20, "num_steps": 2}}],
                        attacks=[{"name": "clean", "kind": "clean"},
                                 {"name": "pgd-4", "kind": "pgd", "eps": "4/255", "steps": 1},
                                 {"name": "pgd-8", "kind": "pgd", "eps": "8/255", "steps": 1},
                                 {"name": "bpda-eot-1", "kind": "bpda", "steps": 1, "eot": 1},
                                 {"name": "bpda-eot-2", "kind": "bpda", "steps": 1, "eot": 2}],
                        paper={})
    run_dir = tmp_path / "sweep"
    run_experiment(load_experiment(write_yaml(tmp_path / "sweep.yaml", values)), run_dir,
                   show_progress=False)
    text = write_report(run_dir).read_text()
    plots = sorted(p.name for p in (run_dir / "plots").glob("accuracy_vs_*.png"))
    assert plots == ["accuracy_vs_eot_bpda_linf.png", "accuracy_vs_eps_pgd_linf.png", "accuracy_vs_t_star.png"]
    assert "Accuracy vs EOT: bpda L∞ ε=8/255 (1 step)" in text
    for name in plots:
        assert f"](plots/{name})" in text
        with Image.open(run_dir / "plots" / name) as image:
            assert image.format == "PNG"
    assert "### L∞ 4/255" in text and "### L∞ 8/255" in text and "samples: 4" in text
    assert text.index("\n| pgd-4 | ") < text.index("\n| bpda-eot-1 | ") and "\n| pgd-8 | " in text


def test_an_attack_limited_to_some_defences_runs_and_counts_only_there():
    """``defenses`` limits an attack: its other cells are empty and their worst case leaves it out."""
    config = ExperimentConfig(
        defenses=[DefenseConfig("a", kind="none"), DefenseConfig("b", kind="none")],
        attacks=[AttackConfig("clean", kind="clean"), AttackConfig("pgd"),
                 AttackConfig("only-b", defenses=["b"])])
    records = [{"index": 0, "defense": d, "attack": a, "correct": True}
               for d, a in [("a", "clean"), ("a", "pgd"), ("b", "clean"), ("b", "pgd")]]
    records.append({"index": 0, "defense": "b", "attack": "only-b", "correct": False})
    rows = {(r["defense"], r["attack"]): r for r in summarize(records, config)["rows"]}
    assert rows["a", "only-b"]["total"] == 0
    assert rows["a", "worst-case"]["over"] == ["clean", "pgd"] and rows["a", "worst-case"]["correct"] == 1
    assert rows["b", "worst-case"]["over"] == ["clean", "pgd", "only-b"] and rows["b", "worst-case"]["correct"] == 0
    alone = ExperimentConfig(defenses=[DefenseConfig("a", kind="none"), DefenseConfig("b", kind="none")],
                             attacks=[AttackConfig("clean", kind="clean"), AttackConfig("only-b", defenses=["b"])])
    rows = {(r["defense"], r["attack"]): r for r in summarize(records, alone)["rows"]}
    assert rows["a", "worst-case"]["total"] == 0  # clean alone is no worst case
    with pytest.raises(ValueError, match="defence"):
        ExperimentConfig(defenses=[DefenseConfig("a", kind="none")],
                         attacks=[AttackConfig("pgd", defenses=["typo"])])
    with pytest.raises(ValueError, match="needs a diffusion purifier"):
        ExperimentConfig(defenses=[DefenseConfig("a", kind="none")], attacks=[AttackConfig("pgd", deviation=1.0)])
    with pytest.raises(ValueError, match="same noise"):
        ExperimentConfig(defenses=[DefenseConfig("a", kind="none")], evaluation={"cascade": True},
                         attacks=[AttackConfig("pgd"), AttackConfig("frozen", frozen_noise=True, start_from="pgd")])
    with pytest.raises(ValueError, match="does not run against a"):
        ExperimentConfig(defenses=[DefenseConfig("a", kind="none"), DefenseConfig("b", kind="none")],
                         attacks=[AttackConfig("t", kind="transfer", defenses=["b"]),
                                  AttackConfig("pgd", start_from="t")])


def test_pareto_front_marks_dominated_defences():
    """A defence is dominated when another is at least as accurate clean and robust at no more
    cost, and strictly better somewhere; equal points dominate neither."""
    from distpure.reporting.pareto import dominated as _dominated

    points = [("cheap", 80.0, 40.0, 10), ("costly-worse", 79.0, 40.0, 20), ("robust", 70.0, 60.0, 20),
              ("twin", 80.0, 40.0, 10)]
    assert [_dominated(p, points) for p in points] == [False, True, False, False]


def test_a_tuning_subset_is_disjoint_from_the_reporting_subset(assets, tmp_path):
    """``data.start`` skips the reporting run's images of the same seeded order."""
    from distpure.evaluation.runner import load_experiment_data

    def loaded(**data):
        values = experiment(assets, data={"dataset": "cifar10", "root": str(assets.data), **data})
        return load_experiment_data(load_experiment(write_yaml(tmp_path / "data.yaml", values)))

    reporting, tuning, both = loaded(limit=4), loaded(start=4, limit=4), loaded(limit=8)
    assert not set(reporting.indices.tolist()) & set(tuning.indices.tolist())
    assert tuning.indices.tolist() == both.indices.tolist()[4:]
    assert torch.equal(tuning.images, both.images[4:]) and torch.equal(tuning.labels, both.labels[4:])
    with pytest.raises(ValueError, match="data.start"):
        loaded(start=-1)


def test_a_run_grows_by_more_images_from_whole_batches(assets, reference_run, tmp_path):
    """Raising data.limit extends a run whose images filled whole batches: the first images'
    records are kept, the new ones form new batches, and the records equal a run sized so from
    the start (here: 4 images, then all 12). A limit that left a partial batch cannot grow, and
    a run cannot shrink."""
    def sized(limit: int | None, name: str):
        values = experiment(assets, data={"dataset": "cifar10", "root": str(assets.data), "limit": limit})
        return load_experiment(write_yaml(tmp_path / f"{name}.yaml", values))

    run_dir = tmp_path / "growing"
    run_experiment(sized(BATCH_SIZE, "small"), run_dir, show_progress=False)
    first = read_records(run_dir / "results.jsonl")
    run_experiment(sized(None, "all"), run_dir, show_progress=False)
    assert RunDirectory(run_dir).finished
    records = read_records(run_dir / "results.jsonl")
    assert [r for r in records if r["index"] < BATCH_SIZE] == first
    assert records == read_records(reference_run / "results.jsonl")
    with pytest.raises(ValueError, match="different experiment"):
        run_experiment(sized(BATCH_SIZE, "shrunk"), run_dir, show_progress=False)
    partial = tmp_path / "partial"
    run_experiment(sized(BATCH_SIZE - 1, "partial"), partial, show_progress=False)
    with pytest.raises(ValueError, match="data.limit"):
        run_experiment(sized(2 * BATCH_SIZE, "more"), partial, show_progress=False)
