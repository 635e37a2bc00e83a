"""ImageNet-30: ADM safetensors loading and purification at 256x256 with the tiny fixture ADM, an
end-to-end smoke run of configs/imagenet30-linf.yaml at 64x64, and the full-size ADM cost benchmark.

The smoke run keeps every defence and attack of the config but shrinks their step counts (see the
config's header); its victim is a randomly initialised ResNet-50, so no accuracy is checked.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import pytest
import torch
import torchvision
import yaml
from diffusers import UNet2DModel
from safetensors.torch import load_file

from distpure.benchmarks import adm_cost
from distpure.benchmarks.adm_cost import ADMCost, EvaluationPlan, forward_flops, format_cost, measure
from distpure.cli.main import main
from distpure.config import load_yaml
from distpure.defenses.purifier import Purifier
from distpure.defenses.recommended import recommended_purifier_config
from distpure.evaluation.records import read_records
from distpure.models.adm import adm_scheduler, adm_unet_config, read_flags
from distpure.models.diffusion import DiffusionModel
from distpure.models.diffusion_loader import load_diffusion
from distpure.models.weights import save_state_dict

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "imagenet30-linf.yaml"
TINY_ADM = "fixtures/adm/adm_tiny_256.safetensors"
TINY_ADM_FLAGS = "fixtures/adm/adm_tiny_256_config.json"
LIMIT = 2
SMOKE_SIZE = 64


@pytest.fixture(scope="module")
def tiny_adm(require_shared: Callable[[str], Path]) -> DiffusionModel:
    """The shared tiny ADM (256x256, learned variance), loaded through ``load_diffusion``."""
    return load_diffusion(require_shared(TINY_ADM))


def test_load_diffusion_reads_adm_safetensors(tiny_adm: DiffusionModel) -> None:
    assert tiny_adm.sample_size == 256 and tiny_adm.learned_variance
    assert tiny_adm.scheduler.config.variance_type == "learned_range"
    assert sum(p.numel() for p in tiny_adm.parameters()) == 6_117_510
    assert all(p.dtype == torch.float32 for p in tiny_adm.parameters())


def test_recommended_imagenet30_purifier_runs_at_256(tiny_adm: DiffusionModel,
                                                     tiny_victim: torch.nn.Module) -> None:
    config = recommended_purifier_config("imagenet30", "victim", num_steps=2)
    purifier = Purifier(tiny_adm, config, victim=tiny_victim)
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        purified = purifier(images)
    assert purified.shape == images.shape and torch.isfinite(purified).all()
    assert 0.0 <= purified.min() and purified.max() <= 1.0 and not torch.equal(purified, images)


def write_smoke_config(source: Path, target: Path) -> dict:
    """``source`` with 1 reverse step per purifier, 1 attack step without EOT and 2 scoring
    draws, every defence and attack kept: a smoke test of the path, not a measurement."""
    config = load_yaml(source)
    config["evaluation"] = {**config.get("evaluation", {}), "draws": 2}
    for defense in config["defenses"]:
        if defense.get("kind", "purifier") == "purifier":
            defense["purifier"] = {**defense.get("purifier", {}), "num_steps": 1}
    for attack in config["attacks"]:
        if attack["kind"] != "clean":
            attack.update(steps=1, eot=1)
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def save_tiny_adm_64(require_shared: Callable[[str], Path], out_dir: Path) -> Path:
    """The shared tiny ADM's topology at 64x64 with random weights, as a diffusers directory:
    the config's path at a sixteenth of the pixels, attention at 16 and 8 px only (the 256-px
    fixture is checked above)."""
    flags = {**read_flags(require_shared(TINY_ADM_FLAGS)), "image_size": SMOKE_SIZE, "attention_resolutions": "16,8"}
    torch.manual_seed(0)
    DiffusionModel(UNet2DModel(**adm_unet_config(flags)).eval(), adm_scheduler(flags)).save_pretrained(out_dir)
    return out_dir


def save_random_resnet50(path: Path) -> Path:
    """A randomly initialised torchvision ResNet-50 state dict (stands in for the real weights)."""
    torch.manual_seed(0)
    save_state_dict(torchvision.models.resnet50(), path)
    return path


def test_imagenet30_config_smoke_run(require_shared: Callable[[str], Path], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Every defence x attack of configs/imagenet30-linf.yaml on 2 sample photos, shrunk to 64x64
    with a 64-px tiny ADM: the path the config takes, at the smallest size that exercises it."""
    monkeypatch.setenv("DISTPURE_DATA", str(require_shared("data/imagenet30-samples").parent))
    adm = save_tiny_adm_64(require_shared, tmp_path / "adm64")
    config = write_smoke_config(CONFIG, tmp_path / "smoke.yaml")
    victim = save_random_resnet50(tmp_path / "resnet50.safetensors")
    run_dir = tmp_path / "run"
    assert main(["evaluate", str(tmp_path / "smoke.yaml"), "--limit", str(LIMIT), "--out", str(run_dir),
                 "--set", f"models.diffusion={adm}", f"models.victim={victim}", f"data.size={SMOKE_SIZE}",
                 "models.victim_arch=imagenet30-resnet50"]) == 0
    records = read_records(run_dir / "results.jsonl")
    defenses = [d["name"] for d in config["defenses"]]
    attacks = [a["name"] for a in config["attacks"]]
    assert {(r["index"], r["defense"], r["attack"]) for r in records} == set(
        itertools.product(range(LIMIT), defenses, attacks))
    assert len(records) == LIMIT * len(defenses) * len(attacks)
    assert all(0 <= r["label"] < 30 and all(0 <= p < 30 for p in r["predictions"]) for r in records)
    assert {len(r["predictions"]) for r in records if r["defense"] == "victim-guided"} == {2}
    purified = load_file(run_dir / "examples" / "victim-guided__pgd-eot.safetensors")["purified"]
    assert purified.shape == (LIMIT, 3, SMOKE_SIZE, SMOKE_SIZE)
    assert main(["report", str(run_dir)]) == 0
    report = (run_dir / "report.md").read_text()
    assert all(name in report for name in [*defenses, *attacks])


def test_full_adm_flops_match_the_published_size() -> None:
    """About 1.12 T multiply-adds per 256x256 image, the figure usually quoted for ADM-256."""
    flops = forward_flops(1)
    assert 2.2e12 < flops < 2.3e12
    assert forward_flops(2) == 2 * flops


def test_evaluation_plan_counts_forwards() -> None:
    plan = EvaluationPlan(images=1, purifier_defenses=1, reverse_steps=1, attack_steps=1, eot=1, draws=1)
    # clean 1 + transfer 1 + BPDA (2 purifications + scoring) 3 + PGD (4 + final loss 1 + scoring 1) 6
    assert plan.forwards_per_image() == 11
    # R = 10 scoring draws: every attack's scoring costs 10 purifications instead of 1
    assert EvaluationPlan(images=1, purifier_defenses=1, reverse_steps=1, attack_steps=1, eot=1
                          ).forwards_per_image() == 11 + 4 * 9
    assert EvaluationPlan().reverse_steps == 15
    assert EvaluationPlan(purifier_defenses=2).forwards_per_image() * 3 == (
        EvaluationPlan().forwards_per_image() * 2)


def test_measure_sees_resident_memory_growth() -> None:
    seconds, growth = measure(lambda: torch.ones(16 * 2**20))  # 64 MiB, touched
    if growth is None:
        pytest.skip("resident-set measurement needs Linux /proc")
    assert seconds >= 0 and growth >= 60


def fake_cost() -> ADMCost:
    return ADMCost(parameters=552_814_086, weights_mib=2108.8, forward_flops=2_239_665_537_024,
                   threads=2, fp32_seconds=30.0, bf16_seconds=10.0, fp32_peak_extra_mib=900.0,
                   bf16_peak_extra_mib=None, process_peak_mib=3000.0, plan=asdict(EvaluationPlan()),
                   forwards_per_evaluation=10, cpu_days=1.0, gpu_hours_estimate=2.0,
                   hardware={"cpu": "Test CPU", "cpu_flags": ["avx2"]})


def test_bench_adm_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(adm_cost, "measure_adm_cost", lambda repeats=1: fake_cost())
    assert main(["bench-adm", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["forward_flops"] == 2_239_665_537_024
    assert main(["bench-adm"]) == 0
    text = capsys.readouterr().out
    assert "2.240 TFLOP" in text and "n/a" in text and format_cost(fake_cost()) in text
    assert "Test CPU (avx2)" in text and "on this CPU (bf16)" in text
