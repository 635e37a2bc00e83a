"""SmoothAdv on the smoothed classifier and the count of certificate violations: the attack on a
linear toy whose smoothed margin is known, gradients through the denoisers, the violation rule
on synthetic records, config validation, and resumed, sharded and CLI attack runs on tiny
models (nothing loads the embedded models)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from distpure.attacks.smoothadv import SmoothAdv, SmoothAdvConfig
from distpure.certification import attack_run as attack_module
from distpure.certification import build_base_classifier
from distpure.certification import runner as runner_module
from distpure.certification.attack_run import (AttackFiles, attack_records, is_violation, run_attack,
                                               summarize_attack, targets)
from distpure.certification.config import load_certify_config
from distpure.certification.runner import claim_certify_dir, run_certification
from distpure.evaluation.distributed import Shard
from distpure.evaluation.rundir import RunDirectory
from test_certification import _run_values, run_assets  # noqa: F401  (run_assets: a fixture)

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- the attack


class SoftLinear:
    """Two classes, logits (0, w·x + b): every draw's gradient of P(class 1) points along w, so
    the smoothed probability depends on x only through w·x and the best L2 attack of radius ε
    moves by ε against w, lowering the margin w·x + b by ε‖w‖."""

    def __init__(self, shape: tuple[int, ...], seed: int = 0) -> None:
        self.w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        self.b = 0.0

    def probabilities(self, noisy: torch.Tensor) -> torch.Tensor:
        margin = (noisy * self.w).flatten(1).sum(1) + self.b
        return torch.stack([torch.zeros_like(margin), margin], 1).softmax(1)

    def margin(self, x: torch.Tensor) -> float:
        return float((x * self.w).sum() + self.b)


def test_smoothadv_moves_against_the_weights_of_a_linear_classifier():
    sigma, epsilon = 0.25, 0.5
    toy = SoftLinear((3, 4, 4))
    image = torch.full((1, 3, 4, 4), 0.5)
    toy.b = 1.0 * sigma * float(toy.w.norm()) - toy.margin(image)  # smoothed margin z = 1
    attack = SmoothAdv(SmoothAdvConfig(epsilon=epsilon, steps=10, m=256), sigma, batch_size=64)
    result = attack.perturb(toy, image, torch.tensor([1]), seed=0)
    delta = result.examples - image
    assert float(delta.norm()) <= epsilon + 1e-5
    assert 0.0 <= float(result.examples.min()) and float(result.examples.max()) <= 1.0
    drop = toy.margin(image) - toy.margin(result.examples)
    assert drop >= 0.95 * epsilon * float(toy.w.norm())  # nearly the optimum ε‖w‖
    clean, _ = attack.true_probability(toy, image, torch.tensor([1]), torch.Generator().manual_seed(1), False)
    assert float(result.probability) < float(clean) - 0.2
    again = attack.perturb(toy, image, torch.tensor([1]), seed=0)
    assert torch.equal(again.examples, result.examples)  # seeded per sample


def test_smoothadv_stays_in_the_ball_and_the_box_with_restarts():
    toy = SoftLinear((3, 4, 4), seed=1)
    image = torch.rand((2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    image[0] = 0.0  # at the box's corner: the box cuts the ball
    attack = SmoothAdv(SmoothAdvConfig(epsilon="128/255", steps=3, m=4, restarts=2), 0.25, batch_size=3)
    result = attack.perturb(toy, image, torch.tensor([1, 0]), seed=3)
    assert (result.examples - image).flatten(1).norm(dim=1).max() <= 128 / 255 + 1e-5
    assert 0.0 <= float(result.examples.min()) and float(result.examples.max()) <= 1.0
    assert attack.draws_per_sample == 2 * 4 * 4


@pytest.mark.parametrize("kind", ["one-shot", "multistep"])
def test_gradients_flow_through_the_denoiser(kind, tiny_victim, tiny_diffusion, tiny_images):
    base = build_base_classifier(tiny_victim, tiny_diffusion, kind, 0.25, steps=1)
    noisy = tiny_images.clone().requires_grad_(True)
    base.reseed(0)
    probabilities = base.probabilities(noisy)
    probabilities[:, 0].sum().backward()
    assert noisy.grad is not None and torch.isfinite(noisy.grad).all() and noisy.grad.abs().sum() > 0
    if kind == "one-shot":  # deterministic: the labels are the argmax of the same logits
        assert torch.equal(base(tiny_images), probabilities.argmax(1))
    attack = SmoothAdv(SmoothAdvConfig(epsilon=0.25, steps=2, m=2), 0.25)
    label = torch.tensor([0])
    result = attack.perturb(base, tiny_images[:1], label, seed=0)
    assert float((result.examples - tiny_images[:1]).norm()) <= 0.25 + 1e-5
    assert 0.0 <= float(result.probability) <= 1.0


# ----------------------------------------------------------------------------- violations


def _certificate(radius: float | None, correct: bool = True, label: int = 1) -> dict:
    return {"radius": radius, "correct": correct, "label": label}


def test_violations_are_certified_samples_predicted_otherwise():
    epsilon = 0.5
    assert is_violation(_certificate(0.6), predicted=0, epsilon=epsilon)  # planted
    assert not is_violation(_certificate(0.6), predicted=None, epsilon=epsilon)  # abstained
    assert not is_violation(_certificate(0.6), predicted=1, epsilon=epsilon)  # right
    assert not is_violation(_certificate(0.4), predicted=0, epsilon=epsilon)  # certified below ε
    assert not is_violation(_certificate(None, correct=False), predicted=0, epsilon=epsilon)
    assert not is_violation(_certificate(0.6, correct=False), predicted=0, epsilon=epsilon)  # wrong class certified
    rows = [{"setting": "s", "epsilon": epsilon, "correct": p == 1, "abstained": p is None,
             "certified_at_epsilon": (r or 0) >= epsilon, "violation": is_violation(_certificate(r), p, epsilon),
             "seconds": 1.0, "denoiser_calls": 10} for r, p in [(0.6, 0), (0.6, None), (0.6, 1), (0.4, 0)]]
    summary = summarize_attack(rows, alpha=0.001)
    assert summary["violations"] == 1 and summary["certified_at_epsilon"] == 3 and summary["abstained"] == 1
    assert summary["accuracy"]["correct"] == 1 and summary["accuracy"]["low"] < 0.25 < summary["accuracy"]["high"]


# ----------------------------------------------------------------------------- config

ATTACK = {"setting": "none", "epsilon": "1/10", "steps": 2, "m": 4, "n": 1000}


def _attack_config(assets, tmp_path: Path, **attack):
    values = _run_values(assets, settings=[{"name": "none", "denoiser": "none", "sigma": 0.25}],
                         attack={**ATTACK, **attack})
    path = tmp_path / f"attack{len(list(tmp_path.glob('attack*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"epsilon": "1/x"}, "epsilon must be a number or a fraction such as 128/255, got '1/x'"),
    ({"epsilon": 0}, "epsilon must be positive, got 0"),
    ({"steps": 0}, "steps must be a whole number of at least 1, got 0"),
    ({"m": 1.5}, "m must be int, got 1.5"),
    ({"n": 100}, "n must be a whole number of at least 1000, got 100"),
    ({"step_size": -1}, "step_size must be positive"),
    ({"setting": "nope"}, "attack: setting 'nope' is not a setting of this run"),
    ({"eot": 4}, "attack: unknown AttackSection field.*eot"),
])
def test_bad_attack_settings_are_refused_when_read_naming_the_value(run_assets, tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        load_certify_config(_attack_config(run_assets, tmp_path, **changes))


def test_the_attack_targets_certified_images_within_its_limits(run_assets, tmp_path):
    config = load_certify_config(_attack_config(run_assets, tmp_path, limit=4))
    certificates = {index: {} for index in (0, 2, 3, 5)}  # a partial run: 1 and 4 not certified yet
    assert targets(config, certificates) == [0, 2, 3]
    assert targets(config, certificates, available=3) == [0, 2]


def test_an_attack_section_keeps_the_committed_partial_run_resumable(tmp_path):
    """The committed run directory was made before the attack section existed: claiming it with
    the committed config (attack section included) compares the same certify fields."""
    committed = ROOT / "results" / "cifar10-certify"
    for name in ("config.yaml", "resolved.json"):
        shutil.copy(committed / name, tmp_path / name)
    config = load_certify_config(ROOT / "configs" / "cifar10-certify.yaml")
    assert config.attack is not None and config.attack.setting == "one-shot-0.25"
    stored_resolved = json.loads((tmp_path / "resolved.json").read_text())
    claim_certify_dir(RunDirectory(tmp_path), config, stored_resolved)  # refuses if a certify field differs
    changed = load_certify_config(ROOT / "configs" / "cifar10-certify.yaml", {"alpha": 0.01})
    with pytest.raises(ValueError, match="alpha"):
        claim_certify_dir(RunDirectory(tmp_path), changed, stored_resolved)


# ----------------------------------------------------------------------------- runs


def _without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


class Killed(Exception):
    pass


def test_a_killed_attack_resumes_to_the_records_of_a_straight_one(run_assets, tmp_path, monkeypatch):
    config = load_certify_config(_attack_config(run_assets, tmp_path))
    without = load_certify_config(_attack_config(run_assets, tmp_path), {"attack": None})
    run_certification(without, tmp_path / "straight", show_progress=False)  # certified before the section existed
    summary = run_attack(config, tmp_path / "straight", show_progress=False)
    reference = _without_time(attack_records(AttackFiles(RunDirectory(tmp_path / "straight"))))
    assert len(reference) == 6 and summary["images"] == 6 and summary["waiting"] == 0
    record = reference[0]
    assert {"index", "dataset_index", "setting", "epsilon", "certified_radius", "certified_correct",
            "attack_probability", "predicted", "p_value", "counts", "correct", "violation",
            "denoiser_calls"} <= set(record)
    assert sum(record["counts"]) == 1000 and record["perturbation_norm"] <= 0.1 + 1e-5

    run_certification(config, tmp_path / "resumed", show_progress=False)
    original, made = attack_module.attack_sample, []

    def killed_after_two(*args, **kwargs):
        if len(made) == 2:
            raise Killed
        made.append(args[4])
        return original(*args, **kwargs)

    monkeypatch.setattr(attack_module, "attack_sample", killed_after_two)
    with pytest.raises(Killed):
        run_attack(config, tmp_path / "resumed", show_progress=False)
    monkeypatch.setattr(attack_module, "attack_sample", original)
    run_attack(config, tmp_path / "resumed", show_progress=False)
    assert _without_time(attack_records(AttackFiles(RunDirectory(tmp_path / "resumed")))) == reference

    monkeypatch.setattr(Shard, "barrier", lambda self: None)
    run_certification(config, tmp_path / "sharded", show_progress=False)
    for rank in (1, 0):  # rank 0 merges the shard files when it finishes
        monkeypatch.setattr(runner_module, "current_shard", lambda device, rank=rank: Shard(rank, 2))
        run_attack(config, tmp_path / "sharded", show_progress=False)
    assert not list((tmp_path / "sharded").glob("attack.rank*.jsonl"))
    assert _without_time(attack_records(AttackFiles(RunDirectory(tmp_path / "sharded")))) == reference

    more_steps = load_certify_config(_attack_config(run_assets, tmp_path, steps=3))
    monkeypatch.setattr(runner_module, "current_shard", lambda device: Shard())
    with pytest.raises(ValueError, match="attack.steps: 2 -> 3"):
        run_attack(more_steps, tmp_path / "straight", show_progress=False)


def test_the_cli_attacks_and_summarises(run_assets, tmp_path, capsys):
    from distpure.cli.main import main

    path = _attack_config(run_assets, tmp_path, limit=2)
    out = str(tmp_path / "cli")
    assert main(["certify", str(path), "--out", out, "--attack"]) == 0  # nothing certified yet: nothing attacked
    assert "no attack records yet" in capsys.readouterr().out
    assert main(["certify", str(path), "--out", out]) == 0
    capsys.readouterr()
    assert main(["certify", str(path), "--out", out, "--attack"]) == 0
    printed = capsys.readouterr().out
    assert "SmoothAdv on none" in printed and "2 images attacked" in printed and "violations: 0" in printed
    assert main(["certify", str(path), "--out", out, "--summary"]) == 0
    assert "accuracy under attack" in capsys.readouterr().out
    summary = json.loads((tmp_path / "cli" / "attack-summary.json").read_text())
    assert summary["images"] == 2
    report = (tmp_path / "cli" / "report.md").read_text()  # the report counts the attack's figures
    row = next(line for line in report.splitlines() if line.startswith("| none | 2 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[3].startswith(f"{100 * summary['accuracy']['value']:.1f} [")
    assert cells[4:7] == [str(summary["abstained"]), str(summary["certified_at_epsilon"]), str(summary["violations"])]
