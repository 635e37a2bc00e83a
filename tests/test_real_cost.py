"""``distpure bench-flops`` and ``bench-score-sde``: the FLOP counter's convention, the models' sizes,
the cost arithmetic of docs/gpu-cost.md, and the cascade fraction it takes from the honest run."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from distpure.benchmarks.real_cost import (HONEST_CASCADE_SKIPPED, CertificationPlan, HonestPlan,
                                           ModelFlops, count_flops, gpu_hours, model_flops,
                                           ncsnpp_size_config, spec_parameters)
from distpure.benchmarks.score_sde_cost import ScoreSDEBenchConfig, run_score_sde_benchmark
from distpure.models.ncsnpp import NCSNpp

ROOT = Path(__file__).resolve().parents[1]


def test_counter_counts_two_flops_per_multiply_add_and_the_input_gradient_only():
    """A 30 -> 20 linear layer: 2 x 600 FLOPs forward; with frozen weights the backward computes
    the input's gradient alone, as many again."""
    build, inputs = (lambda: nn.Linear(30, 20)), (lambda: (torch.randn(1, 30),))
    assert count_flops(build, inputs) == 1200
    assert count_flops(build, inputs, gradient=True) == 2400


def test_full_ncsnpp_is_the_checkpoint_size(require_shared):
    require_shared("fixtures/score-sde")
    config = ncsnpp_size_config("full")
    assert (config.nf, config.num_res_blocks, config.ch_mult) == (128, 8, (1, 2, 2, 2))
    with torch.device("meta"):
        parameters = sum(p.numel() for p in NCSNpp(config).parameters())
    assert parameters == spec_parameters() == 106_632_579


def test_cost_arithmetic_by_hand():
    """Round numbers through both plans, checked against the arithmetic written out."""
    flops = {"ncsnpp": ModelFlops(0, 10, 20), "wrn": ModelFlops(0, 3, 6)}
    plan = HonestPlan(images=2, sde_steps=4, iterations=5, eot=2, draws=3, scorings=3, cascade_skipped=0.5)
    assert plan.purification_flops(flops) == 4 * 10 + 3
    assert plan.gradient_flops(flops) == 4 * (10 + 20) + 6
    scoring = 3 * 43
    attacked = 5 * 2 * 126 + 2 * scoring
    assert plan.flops_per_image(flops, cascade=False) == {
        "clean_scoring": scoring, "attack_and_its_scoring": attacked, "total": scoring + attacked}
    assert plan.flops_per_image(flops, cascade=True)["total"] == scoring + attacked / 2
    assert CertificationPlan(draws=100, selection_draws=10).flops_per_image(flops) == 110 * 13
    hours = gpu_hours(312e12 * 0.5 * 3600, utilisation=0.5)
    assert hours["A100"] == pytest.approx(1.0) and hours["H100 SXM"] == pytest.approx(312 / 989)


def test_cascade_fraction_is_the_honest_runs():
    report = (ROOT / "results" / "cifar10-honest" / "report.md").read_text()
    skipped = re.search(r"(\d+) % of the purifier passes", report)
    assert skipped and int(skipped[1]) / 100 == HONEST_CASCADE_SKIPPED


def test_tiny_models_flops(require_shared):
    """The tiny NCSN++ and WRN-10-1: a gradient costs about twice a forward (frozen weights)."""
    require_shared("fixtures/score-sde")
    flops = model_flops("tiny")
    for model in flops.values():
        assert 1.9 < model.forward_backward / model.forward < 2.2
    assert flops["ncsnpp"].parameters == 2_474_787


def test_score_sde_benchmark_runs_the_tiny_setting(require_shared):
    require_shared("fixtures/score-sde")
    result = run_score_sde_benchmark(ScoreSDEBenchConfig(size="tiny", batch=1, dt=0.05, device="cpu"))
    assert result["sde_steps"] == 2 and result["ncsnpp_parameters"] == 2_474_787
    assert result["purification_images_per_second"] == pytest.approx(1 / result["purification_seconds"])
    assert result["gradient_seconds"] > 0 and result["gradient_flops_per_second"] > 0
