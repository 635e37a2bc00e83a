"""``distpure bench-certify``: draws per second of the smoothed classifier's class counting
(``SmoothedClassifier.class_counts``: noise, denoiser, victim, counts) against the bare denoiser
and victim forward on one batch of the same size (the limit counting can approach), per denoiser
kind, on the embedded models.

The two are timed alternately, ``repeats`` times each after one warm-up, so that a change in the
machine's load hits both; the fastest of each gives the ratio. The image is a seeded uniform one:
the networks' cost does not depend on what the image shows.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..certification.denoisers import DENOISER_KINDS, build_base_classifier
from ..certification.smoothing import SmoothedClassifier
from ..devices import check_precision, describe_hardware, hardware, resolve_device
from ..models.classifiers import load_classifier
from ..models.diffusion_loader import load_diffusion
from ..models.noise_predictor import NoisePredictor
from .resources import wall_seconds


@dataclass
class CertifyBenchConfig:
    """The measured counting: ``batches`` batches of ``batch_size`` draws at smoothing noise
    ``sigma`` per timed count, for each of ``denoisers`` (reverse kinds with ``steps`` steps),
    on ``victim`` behind ``diffusion``."""

    denoisers: tuple[str, ...] = ("one-shot", "multistep")
    batch_size: int = 100
    batches: int = 2
    repeats: int = 3
    sigma: float = 0.25
    steps: int = 2
    victim: str = "cifar10-resnet18"
    diffusion: str = "cifar10-ddpm-small"
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        check_precision(self.precision)
        self.denoisers = tuple(self.denoisers)
        unknown = [kind for kind in self.denoisers if kind not in DENOISER_KINDS]
        if unknown or not self.denoisers:
            raise ValueError(f"denoisers must be some of {', '.join(DENOISER_KINDS)}, got {list(self.denoisers)}")
        if min(self.batch_size, self.batches, self.repeats, self.steps) < 1:
            raise ValueError(f"batch_size, batches, repeats and steps must be at least 1, got {self.batch_size}, "
                             f"{self.batches}, {self.repeats}, {self.steps}")


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the system has none)."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def measure_counting(victim: nn.Module, diffusion: NoisePredictor, config: CertifyBenchConfig,
                     device: torch.device) -> dict:
    """Per denoiser kind: the draws per second of every timed repeat of counting and of the bare
    forward, the fastest of each, and their ratio (counting over bare)."""
    shape = (diffusion.image_channels, diffusion.sample_size, diffusion.sample_size)
    image = torch.rand(shape, generator=torch.Generator().manual_seed(config.seed)).to(device)
    with torch.no_grad():
        classes = int(victim(image[None]).shape[-1])
    draws = config.batch_size * config.batches
    noisy = image[None] + config.sigma * torch.randn((config.batch_size, *shape),
                                                     generator=torch.Generator().manual_seed(config.seed + 1)).to(device)
    kinds = {}
    for kind in config.denoisers:
        base = build_base_classifier(victim, diffusion, kind, config.sigma, steps=config.steps,
                                     precision=config.precision)
        smoothed = SmoothedClassifier(base, classes, config.sigma, config.batch_size, device)

        def counting() -> None:
            smoothed.class_counts(image, draws, torch.Generator().manual_seed(config.seed))

        def bare() -> None:
            with torch.no_grad():
                base(noisy)

        counting()  # warm-up
        bare()
        rates = {"counting": [], "bare": []}
        for _ in range(config.repeats):
            rates["bare"].append(config.batch_size / wall_seconds(bare, device))
            rates["counting"].append(draws / wall_seconds(counting, device))
        best = {name: max(values) for name, values in rates.items()}
        kinds[kind] = {"denoiser_calls_per_draw": base.denoiser_calls,
                       "counting_draws_per_second": best["counting"], "bare_draws_per_second": best["bare"],
                       "ratio": best["counting"] / best["bare"],
                       "counting_repeats": rates["counting"], "bare_repeats": rates["bare"]}
    return kinds


def run_certify_benchmark(config: CertifyBenchConfig) -> dict:
    """Load the models, measure, and say on what: hardware (CPU model, threads, resolved
    precision) and the load average before and after."""
    device = resolve_device(config.device)
    victim = load_classifier(config.victim, device=device)
    diffusion = load_diffusion(config.diffusion).to(device)
    started = load_average()
    kinds = measure_counting(victim, diffusion, config, device)
    info = hardware(device, config.precision)
    return {"config": asdict(config), "batch_size": config.batch_size, "draws_per_count": config.batch_size
            * config.batches, "precision": info["resolved_precision"], "threads": info["torch_threads"],
            "cpu": info["cpu"], "hardware": info, "load_average_start": started, "load_average_end": load_average(),
            "denoisers": kinds}


def write_benchmark(result: dict, path: str | Path) -> Path:
    """Write ``result`` as one JSON file (its folder created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path


def format_certify_benchmark(result: dict) -> str:
    """The figures as lines, the hardware and load first."""
    lines = [describe_hardware(result["hardware"]),
             f"load average (1, 5, 15 min): {result['load_average_start']} at start, {result['load_average_end']} at end",
             f"batch {result['batch_size']}, {result['draws_per_count']} draws per timed count"]
    for kind, figures in result["denoisers"].items():
        lines.append(f"{kind} ({figures['denoiser_calls_per_draw']} denoiser calls per draw): counting "
                     f"{figures['counting_draws_per_second']:.2f} draws/s, bare forward "
                     f"{figures['bare_draws_per_second']:.2f} draws/s -> ratio {figures['ratio']:.3f}")
    return "\n".join(lines)
