"""``distpure bench`` end to end at toy sizes: every figure present, finite and consistent."""
from __future__ import annotations

import json
import math

import pytest

from distpure.benchmarks.purification import BenchConfig, format_benchmark
from distpure.cli.main import main


def test_bench_reports_every_figure(require_shared, capsys):
    """``distpure bench --json`` on one image and the smallest sizes (a smoke test: the figures
    themselves come from the full bench): every figure present, finite and consistent."""
    require_shared("data/cifar10-jpeg")
    assert main(["bench", "--json", "--set", "throughput_images=1", "accuracy_images=1", "reference_batch_size=1",
                 "fast_batch_size=1", "gradient_batch_size=1", "gradient_steps=[1,2]", "flops_batch_size=1",
                 "matmul_size=128"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["gradient_steps"] == [1, 2]
    assert result["reference_config"]["num_steps"] is None and result["reference_config"]["precision"] == "fp32"
    assert result["fast_config"]["num_steps"] == 10 and result["fast_config"]["precision"] == "auto"
    resolved = result["hardware"]["resolved_precision"]
    assert resolved == ("bf16" if result["hardware"]["native_bf16"] else "fp32")
    # where the fast path runs in bf16, fp32 is measured beside it and the faster one named
    assert ("fast_fp32_images_per_second" in result) == (resolved == "bf16")
    if resolved == "bf16":
        faster = max(("bf16", result["fast_images_per_second"]),
                     ("fp32", result["fast_fp32_images_per_second"]), key=lambda pair: pair[1])[0]
        assert result["faster_precision"] == faster
    assert result["speedup"] == result["fast_images_per_second"] / result["reference_images_per_second"]
    assert result["speedup"] > 1  # 10 steps against every one of the t* fp32 steps
    for path in ("fast", "reference"):
        assert set(result[f"{path}_accuracy"]) == {"clean", "transfer_robust"}
        assert all(value in (0, 1) for value in result[f"{path}_accuracy"].values())
    for key in ("gradient_1_steps_plain", "gradient_2_steps_checkpointed"):
        assert result[key]["seconds"] > 0
    assert result["checkpointed_memory_ratio_2_vs_1"] > 0
    assert 0 < result["unet_fraction_of_matmul"] < 10 and result["unet_gflops_per_image"] > 0.1
    assert result["targets_met"]["speedup_at_least_10x"] == (result["speedup"] >= 10)
    assert result["targets_met"]["unet_at_least_30_percent_of_matmul"] == (result["unet_fraction_of_matmul"] >= 0.3)
    text = format_benchmark(result)
    assert text.startswith(f"precision {resolved} (auto) on cpu: {result['hardware']['cpu']}")
    assert "targets: speedup_at_least_10x" in text
    assert "speed-up" in text and "2 vs 1 steps" in text
    assert all(math.isfinite(v) for v in (result["fast_channels_last_images_per_second"],
                                           result["unet_flops_per_second"]))


def test_bench_refuses_more_gradient_steps_than_t_star():
    with pytest.raises(ValueError, match="more reverse steps than t"):
        BenchConfig(gradient_steps=(10, 200))
    assert BenchConfig(gradient_steps=(10, 200), gradient_t_star=200).gradient_steps == (10, 200)


def test_attack_bench_times_every_gradient_kind_both_ways(require_shared, capsys):
    """``distpure bench-attack`` at toy sizes: every gradient kind, batched and sequential EOT,
    ratios consistent with the times, targets derived from them."""
    require_shared("data/cifar10-jpeg")
    assert main(["bench-attack", "--json", "--set", "images=1", "eot=2", "repeats=1", "num_steps=2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["steps"]) == {"exact", "exact-checkpointed", "bpda", "surrogate-soft"}
    forward = result["purification_forward_seconds"]
    for step in result["steps"].values():
        assert step["batched_seconds"] > 0 and step["sequential_seconds"] > 0
        assert step["batching_speedup"] == pytest.approx(step["sequential_seconds"] / step["batched_seconds"])
        assert step["step_vs_forward"] == pytest.approx(
            min(step["batched_seconds"], step["sequential_seconds"]) / forward)
    exact = result["steps"]["exact"]
    assert result["targets_met"] == {"eot_batching_at_least_1.5x": exact["batching_speedup"] >= 1.5,
                                     "exact_step_at_most_3.5x_forward": exact["step_vs_forward"] <= 3.5}
    # BPDA skips the purifier's backward: its step is cheaper than the exact one's
    assert result["steps"]["bpda"]["batched_seconds"] < result["steps"]["exact-checkpointed"]["batched_seconds"]


def test_certify_bench_writes_counting_against_the_bare_forward(tmp_path, monkeypatch, capsys):
    """``distpure bench-certify`` on tiny models: one JSON with every field, each ratio the
    measured counting rate over the measured bare rate."""
    from conftest import make_tiny_diffusion, make_tiny_victim
    from distpure.benchmarks import certify_cost

    monkeypatch.setattr(certify_cost, "load_classifier", lambda name, device: make_tiny_victim())
    monkeypatch.setattr(certify_cost, "load_diffusion", lambda name: make_tiny_diffusion())
    out = tmp_path / "bench" / "certify.json"
    assert main(["bench-certify", "--out", str(out), "--set", "batch_size=4", "batches=2", "repeats=2",
                 "device=cpu"]) == 0
    result = json.loads(out.read_text())
    assert {"batch_size", "draws_per_count", "precision", "threads", "cpu", "hardware", "load_average_start",
            "load_average_end", "denoisers", "config"} <= set(result)
    assert (result["batch_size"], result["draws_per_count"]) == (4, 8)
    assert result["precision"] == result["hardware"]["resolved_precision"]
    assert result["cpu"] == result["hardware"]["cpu"] and result["threads"] >= 1
    assert len(result["load_average_start"]) == 3
    assert set(result["denoisers"]) == {"one-shot", "multistep"}
    for figures in result["denoisers"].values():
        assert len(figures["counting_repeats"]) == len(figures["bare_repeats"]) == 2
        assert figures["counting_draws_per_second"] == max(figures["counting_repeats"]) > 0
        assert figures["bare_draws_per_second"] == max(figures["bare_repeats"]) > 0
        assert figures["ratio"] == figures["counting_draws_per_second"] / figures["bare_draws_per_second"]
    assert result["denoisers"]["multistep"]["denoiser_calls_per_draw"] == 2
    assert "ratio" in capsys.readouterr().out
    with pytest.raises(ValueError, match="denoisers must be some of"):
        certify_cost.CertifyBenchConfig(denoisers=("two-shot",))
