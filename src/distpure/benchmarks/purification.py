"""``distpure bench``: the fast purification path against the DiffPure recipe, attack cost, FLOP/s.

Absolute times vary from run to run on a shared machine; the ratios are what to track.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..attacks.pgd import PGDConfig, pgd
from ..data import default_data_root, load_cifar10
from ..defenses.defended import DefendedClassifier
from ..defenses.purifier import Purifier, PurifierConfig
from ..defenses.recommended import load_defense
from ..devices import (AUTOCAST_DTYPES, autocast, check_precision, describe_hardware, hardware,
                       resolve_device, resolve_precision)
from .resources import measure, synchronize


@dataclass
class BenchConfig:
    """Sizes of the benchmark; the defaults are the ones the README reports."""

    throughput_images: int = 128
    accuracy_images: int = 512
    reference_batch_size: int = 32
    fast_batch_size: int = 256
    gradient_batch_size: int = 4
    gradient_steps: tuple[int, int] = (10, 100)
    gradient_t_star: int = 100
    flops_batch_size: int = 128
    matmul_size: int = 4096
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        check_precision(self.precision)
        few, many = self.gradient_steps
        if not 1 <= few <= many <= self.gradient_t_star:
            raise ValueError(f"gradient_steps must satisfy 1 <= few <= many <= gradient_t_star "
                             f"({self.gradient_t_star}): a purification cannot take more reverse "
                             f"steps than t* has DDPM steps; got {list(self.gradient_steps)}")


def reference_config(fast: PurifierConfig, batch_size: int) -> PurifierConfig:
    """The DiffPure recipe: float32, every one of the t* DDPM steps, a small batch."""
    return replace(fast, precision="fp32", num_steps=None, batch_size=batch_size)


def images_per_second(purifier: Purifier, images: torch.Tensor) -> float:
    """Purification throughput on ``images`` (one warm-up batch first)."""
    with torch.no_grad():
        purifier(images[: min(8, len(images))])
        synchronize(images.device)
        start = time.perf_counter()
        purifier(images)
        synchronize(images.device)
    return len(images) / (time.perf_counter() - start)


def accuracies(defended: DefendedClassifier, images: torch.Tensor, labels: torch.Tensor,
               adversarial: torch.Tensor) -> dict[str, float]:
    """Clean and transfer-attack accuracy of ``defended``."""
    with torch.no_grad():
        clean = (defended(images).argmax(1) == labels).float().mean().item()
        robust = (defended(adversarial).argmax(1) == labels).float().mean().item()
    return {"clean": clean, "transfer_robust": robust}


def _unet_inputs(purifier: Purifier, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch and timesteps for the purifier's UNet, on its device."""
    device = next(purifier.diffusion.parameters()).device
    size = purifier.diffusion.sample_size
    x = torch.randn(batch, purifier.diffusion.image_channels, size, size, device=device)
    return x, torch.full((batch,), 100, device=device)


def unet_flops(purifier: Purifier, batch: int) -> int:
    """FLOPs of one UNet forward pass at ``batch`` (multiply-add = 2 FLOPs)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        purifier.diffusion(*_unet_inputs(purifier, batch))
    return counter.get_total_flops()


def unet_flops_per_second(purifier: Purifier, batch: int = 128, repeats: int = 3) -> float:
    """Achieved FLOP/s of the UNet forward at the purifier's precision."""
    x, t = _unet_inputs(purifier, batch)
    with torch.no_grad(), autocast(x.device, purifier.config.precision):
        purifier.diffusion(x, t)
        synchronize(x.device)
        start = time.perf_counter()
        for _ in range(repeats):
            purifier.diffusion(x, t)
        synchronize(x.device)
    return unet_flops(purifier, batch) * repeats / (time.perf_counter() - start)


def matmul_flops_per_second(precision: str, size: int = 4096, repeats: int = 5,
                            device: torch.device | str = "cpu") -> float:
    """Measured FLOP/s of a large matrix product in ``precision`` (resolved on ``device``): the
    machine's practical ceiling for the UNet at that precision."""
    dtype = AUTOCAST_DTYPES[resolve_precision(precision, device)] or torch.float32
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def gradient_step_cost(t_star: int, num_steps: int, checkpointed: bool, batch: int,
                       device: torch.device | str = "cpu") -> dict[str, float]:
    """Wall time and peak memory of one exact input gradient through a ``num_steps`` purification
    from ``t_star``, measured in a fresh subprocess so that peak memory (resident set on a CPU,
    allocated memory on a GPU) belongs to this measurement alone."""
    code = (f"from distpure.benchmarks.purification import _gradient_step_in_process as g; "
            f"g({t_star}, {num_steps}, {checkpointed}, {batch}, {str(device)!r})")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, env={**os.environ, "TQDM_DISABLE": "1"}).stdout
    return json.loads(output.strip().splitlines()[-1])


def _gradient_step_in_process(t_star: int, num_steps: int, checkpointed: bool, batch: int,
                              device: str = "cpu") -> None:
    defended = load_defense("cifar10", "victim", device=device, t_star=t_star, num_steps=num_steps,
                            checkpoint_steps=checkpointed)
    images = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    seconds, peak_extra_mib = measure(lambda: pgd(defended, images, labels,
                                                  PGDConfig(steps=1, keep_best=False)), device)
    print(json.dumps({"seconds": seconds, "peak_extra_mb": peak_extra_mib}))


def run_benchmark(config: BenchConfig) -> dict:
    """Every figure of the benchmark in one dictionary."""
    device = resolve_device(config.device)
    fast = load_defense("cifar10", "victim", device=device, batch_size=config.fast_batch_size,
                        seed=config.seed, precision=config.precision)
    fast_purifier = fast.purifier
    reference_purifier = fast_purifier.variant(**asdict(reference_config(fast_purifier.config,
                                                                         config.reference_batch_size)))
    data = load_cifar10(default_data_root() / "cifar10-jpeg", "test", n=config.accuracy_images,
                        seed=config.seed)
    images, labels = data.images.to(device), data.labels.to(device)
    sample = images[: config.throughput_images]
    result = {"hardware": hardware(device, config.precision), "fast_config": asdict(fast_purifier.config),
              "reference_config": asdict(reference_purifier.config)}
    result["fast_images_per_second"] = images_per_second(fast_purifier, sample)
    result |= precision_comparison(fast_purifier, sample, result["fast_images_per_second"])
    result["reference_images_per_second"] = images_per_second(reference_purifier, sample)
    result["speedup"] = result["fast_images_per_second"] / result["reference_images_per_second"]
    # the same path in channels-last layout (off by default: it pays on CUDA, not on this CPU)
    result["fast_channels_last_images_per_second"] = images_per_second(
        fast_purifier.variant(channels_last=True), sample)
    fast_purifier.diffusion.to(memory_format=torch.contiguous_format)
    adversarial = pgd(fast.victim, images, labels, PGDConfig(steps=20))
    for name, purifier in (("fast", fast_purifier), ("reference", reference_purifier)):
        purifier.reseed(config.seed)
        result[f"{name}_accuracy"] = accuracies(DefendedClassifier(fast.victim, purifier),
                                                images, labels, adversarial)
    few, many = config.gradient_steps
    result["gradient_t_star"] = config.gradient_t_star
    for steps in (few, many):
        for checkpointed in (False, True):
            key = f"gradient_{steps}_steps_{'checkpointed' if checkpointed else 'plain'}"
            result[key] = gradient_step_cost(config.gradient_t_star, steps, checkpointed,
                                             config.gradient_batch_size, device)
    result["gradient_steps"] = [few, many]
    result[f"checkpointed_memory_ratio_{many}_vs_{few}"] = (
        result[f"gradient_{many}_steps_checkpointed"]["peak_extra_mb"]
        / max(1e-9, result[f"gradient_{few}_steps_checkpointed"]["peak_extra_mb"]))
    result["unet_gflops_per_image"] = unet_flops(fast_purifier, 1) / 1e9
    result["unet_flops_per_second"] = unet_flops_per_second(fast_purifier, config.flops_batch_size)
    result["matmul_flops_per_second"] = matmul_flops_per_second(config.precision, config.matmul_size,
                                                                device=device)
    result["unet_fraction_of_matmul"] = result["unet_flops_per_second"] / result["matmul_flops_per_second"]
    result["targets_met"] = targets_met(result)
    return result


def precision_comparison(fast: Purifier, images: torch.Tensor, fast_images_per_second: float) -> dict:
    """Where the fast path runs in bf16 (or fp16 on a GPU) natively, its throughput in fp32 too,
    and which is faster here (the answer differs between CPUs); nothing where it runs in fp32."""
    resolved = resolve_precision(fast.config.precision, images.device)
    if resolved == "fp32":
        return {}
    fp32_images_per_second = images_per_second(fast.variant(precision="fp32"), images)
    faster = "fp32" if fp32_images_per_second > fast_images_per_second else resolved
    return {"fast_fp32_images_per_second": fp32_images_per_second, "faster_precision": faster}


def targets_met(result: dict) -> dict[str, bool]:
    """The performance issue's targets, each checked against this run's figures."""
    few, many = result["gradient_steps"]
    fast, reference = result["fast_accuracy"], result["reference_accuracy"]
    return {
        "speedup_at_least_10x": result["speedup"] >= 10,
        "clean_within_2_points": abs(fast["clean"] - reference["clean"]) <= 0.02,
        "transfer_robust_within_2_points":
            abs(fast["transfer_robust"] - reference["transfer_robust"]) <= 0.02,
        "checkpointed_memory_at_most_1.5x": result[f"checkpointed_memory_ratio_{many}_vs_{few}"] <= 1.5,
        "unet_at_least_30_percent_of_matmul": result["unet_fraction_of_matmul"] >= 0.3,
    }


def format_benchmark(result: dict) -> str:
    """The benchmark as a short human-readable report with the ratios up front."""
    fast, reference = result["fast_accuracy"], result["reference_accuracy"]
    lines = [
        describe_hardware(result["hardware"]),
        f"purification throughput: fast {result['fast_images_per_second']:.2f} img/s, "
        f"reference (DiffPure recipe) {result['reference_images_per_second']:.3f} img/s "
        f"-> speed-up {result['speedup']:.1f}x",
        f"accuracy, fast vs reference: clean {100 * fast['clean']:.1f} vs {100 * reference['clean']:.1f} %, "
        f"transfer PGD {100 * fast['transfer_robust']:.1f} vs {100 * reference['transfer_robust']:.1f} %",
        f"fast path in channels-last layout: {result['fast_channels_last_images_per_second']:.2f} img/s",
    ]
    if "fast_fp32_images_per_second" in result:
        lines.append(f"fast path in fp32: {result['fast_fp32_images_per_second']:.2f} img/s; "
                     f"{result['faster_precision']} is faster on this machine")
    few, many = result["gradient_steps"]
    for steps in (few, many):
        plain = result[f"gradient_{steps}_steps_plain"]
        checkpointed = result[f"gradient_{steps}_steps_checkpointed"]
        lines.append(f"exact gradient, {steps} steps from t* = {result['gradient_t_star']}: "
                     f"plain {plain['seconds']:.1f} s / "
                     f"{plain['peak_extra_mb']:.0f} MB, checkpointed {checkpointed['seconds']:.1f} s / "
                     f"{checkpointed['peak_extra_mb']:.0f} MB")
    lines.append(f"checkpointed peak memory, {many} vs {few} steps: "
                 f"{result[f'checkpointed_memory_ratio_{many}_vs_{few}']:.2f}x")
    lines.append(f"UNet forward: {result['unet_gflops_per_image']:.2f} GFLOP/image, "
                 f"{result['unet_flops_per_second'] / 1e9:.0f} GFLOP/s = "
                 f"{100 * result['unet_fraction_of_matmul']:.0f} % of the "
                 f"{result['hardware']['resolved_precision']} matmul rate "
                 f"({result['matmul_flops_per_second'] / 1e9:.0f} GFLOP/s)")
    lines.append("targets: " + ", ".join(f"{name} {'yes' if met else 'NO'}"
                                         for name, met in result["targets_met"].items()))
    return "\n".join(lines)
