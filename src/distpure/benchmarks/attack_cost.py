"""``distpure bench-attack``: what one PGD-EOT step through the defence costs, per gradient kind
(exact, checkpointed or not; BPDA; the soft-target surrogate), with the EOT draws run as one
batch or one by one, beside a purification forward of the same images and draws.

The step is timed exactly as PGD runs it (``eot_loss_and_gradient``), on the recommended CIFAR-10
defence and CIFAR-10 test images. Each figure is the fastest of ``repeats`` timed runs after one
warm-up.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..attacks.base import ATTACKS
from ..attacks.pgd import PGDConfig, eot_loss_and_gradient
from ..attacks.suite import AttackConfig
from ..data import default_data_root, load_cifar10
from ..defenses.recommended import RECOMMENDED, load_defense
from ..devices import describe_hardware, hardware, resolve_device
from .resources import wall_seconds

# The gradients an attack can take, as attack settings (kind, and what it changes).
GRADIENTS = {
    "exact": {"kind": "pgd", "checkpoint": False},
    "exact-checkpointed": {"kind": "pgd", "checkpoint": True},
    "bpda": {"kind": "bpda", "checkpoint": False},
    "surrogate-soft": {"kind": "surrogate", "checkpoint": False, "surrogate": {"target": "soft"}},
}


@dataclass
class AttackBenchConfig:
    """The images and draws of the measured step (8 x EOT 8: one attack batch of a CPU run), and
    the defence's reverse steps (the recommended 10; fewer only to shrink a smoke run)."""

    images: int = 8
    eot: int = 8
    repeats: int = 2
    precision: str = "auto"
    device: str = "auto"
    num_steps: int = RECOMMENDED["cifar10"]["purifier"].num_steps
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.images, self.eot, self.repeats) < 1:
            raise ValueError(f"images, eot and repeats must be at least 1, got {self.images}, {self.eot}, "
                             f"{self.repeats}")


def fastest_seconds(work: Callable[[], object], repeats: int, device: torch.device | str = "cpu") -> float:
    """The shortest wall time of ``repeats`` runs of ``work`` on ``device``, after one untimed warm-up."""
    work()
    return min(wall_seconds(work, device) for _ in range(repeats))


def run_attack_benchmark(config: AttackBenchConfig) -> dict:
    """Seconds of a purification forward of images x draws, and of one EOT gradient step per
    gradient kind, batched and sequential, with the ratios the converged-attack issue tracks."""
    device = resolve_device(config.device)
    defense = load_defense("cifar10", "victim", device=device, seed=config.seed, precision=config.precision,
                           num_steps=config.num_steps)
    data = load_cifar10(default_data_root() / "cifar10-jpeg", "test", n=config.images, seed=config.seed)
    images, labels = data.images.to(device), data.labels.to(device)
    with torch.no_grad():
        forward = fastest_seconds(lambda: defense(images.repeat(config.eot, 1, 1, 1)), config.repeats, device)
    result = {"hardware": hardware(device, config.precision), "config": asdict(config),
              "purification_forward_seconds": forward, "steps": {}}
    for name, settings in GRADIENTS.items():
        attack = ATTACKS.build(settings["kind"], config=AttackConfig(name, **settings))
        model = attack.attacked_model(defense, config.seed)
        timings = {}
        for mode, eot_batch in (("batched", config.eot), ("sequential", 1)):
            pgd_config = PGDConfig(eot=config.eot, eot_batch=eot_batch)
            timings[f"{mode}_seconds"] = fastest_seconds(
                lambda: eot_loss_and_gradient(model, images, labels, pgd_config), config.repeats, device)
        timings["batching_speedup"] = timings["sequential_seconds"] / timings["batched_seconds"]
        timings["step_vs_forward"] = min(timings["batched_seconds"], timings["sequential_seconds"]) / forward
        result["steps"][name] = timings
    exact = result["steps"]["exact"]
    result["targets_met"] = {"eot_batching_at_least_1.5x": exact["batching_speedup"] >= 1.5,
                             "exact_step_at_most_3.5x_forward": exact["step_vs_forward"] <= 3.5}
    return result


def format_attack_benchmark(result: dict) -> str:
    """The figures as lines, the hardware first."""
    config = result["config"]
    lines = [describe_hardware(result["hardware"]),
             f"purification forward of {config['images']} images x {config['eot']} draws: "
             f"{result['purification_forward_seconds']:.2f} s"]
    for name, step in result["steps"].items():
        lines.append(f"{name} gradient, EOT {config['eot']}: batched {step['batched_seconds']:.2f} s, "
                     f"one draw at a time {step['sequential_seconds']:.2f} s -> batching "
                     f"{step['batching_speedup']:.2f}x; fastest step = {step['step_vs_forward']:.2f}x the forward")
    lines.append("targets: " + ", ".join(f"{name} {'yes' if met else 'NO'}"
                                         for name, met in result["targets_met"].items()))
    return "\n".join(lines)
