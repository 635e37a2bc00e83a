"""``distpure bench-score-sde``: DiffPure's real CIFAR-10 setting, timed. The score-SDE NCSN++
(random weights, built from the spec of ``checkpoint_8.pth``) purifies a batch through the
reverse VP-SDE (100 Euler-Maruyama steps from t* = 0.1), and one exact input gradient runs
through all of them, checkpointed per step, into a WRN-28-10 victim (random weights): one EOT
draw of one attack step. ``size=tiny`` runs the same with the fixture's tiny NCSN++ and a
WRN-10-1, for CPUs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..attacks.pgd import PGDConfig, eot_loss_and_gradient
from ..defenses.defended import DefendedClassifier
from ..defenses.purifier import Purifier, PurifierConfig
from ..devices import autocast, check_precision, describe_hardware, hardware, resolve_device
from .real_cost import model_flops, ncsnpp_size_config, random_ncsnpp, spec_parameters, wide_resnet
from .resources import measure


@dataclass
class ScoreSDEBenchConfig:
    """The run: model size, batch, SDE start (t* in steps of 1000) and step ``dt``."""

    size: str = "full"
    batch: int = 16
    t_star: int = 100
    dt: float = 1e-3
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.size not in ("full", "tiny") or self.batch < 1:
            raise ValueError(f"size must be full or tiny and batch at least 1, got {self.size!r}, {self.batch}")


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    """Refuse a NaN or Inf result: a run that produces one has not worked."""
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} has non-finite values")


def run_score_sde_benchmark(config: ScoreSDEBenchConfig) -> dict:
    """Seconds, images/s, peak memory and achieved FLOP/s of one purification and one exact
    checkpointed gradient of the batch."""
    device = resolve_device(config.device)
    diffusion = random_ncsnpp(ncsnpp_size_config(config.size), config.seed).to(device)
    parameters = sum(p.numel() for p in diffusion.parameters())
    if config.size == "full" and parameters != spec_parameters():
        raise ValueError(f"the full NCSN++ has {parameters:,} parameters, the checkpoint {spec_parameters():,}")
    purifier = Purifier(diffusion, PurifierConfig(
        t_star=config.t_star, guidance="none", sampler="sde", dt=config.dt, precision=config.precision,
        batch_size=config.batch, checkpoint_steps=True, seed=config.seed))
    defended = DefendedClassifier(wide_resnet(config.size).to(device), purifier)
    generator = torch.Generator().manual_seed(config.seed)
    images = torch.rand(config.batch, 3, 32, 32, generator=generator).to(device)
    labels = torch.randint(0, 10, (config.batch,), generator=generator).to(device)
    with torch.no_grad(), autocast(device, config.precision):  # warm-up: kernels, cuDNN choices
        diffusion(images * 2 - 1, torch.full((config.batch,), 99.9, device=device))
    outputs = {}

    def purify() -> None:
        with torch.no_grad():
            outputs["purified"] = purifier(images)

    def gradient() -> None:
        outputs["gradient"] = eot_loss_and_gradient(defended, images, labels, PGDConfig())[1]

    purify_seconds, purify_peak = measure(purify, device)
    gradient_seconds, gradient_peak = measure(gradient, device)
    for name, tensor in outputs.items():
        _check_finite(name, tensor)
    if not outputs["gradient"].abs().sum() > 0:
        raise ValueError("the exact gradient through the reverse SDE is zero")
    flops = model_flops(config.size)
    steps = len(purifier.timesteps)
    purify_flops = config.batch * steps * flops["ncsnpp"].forward
    gradient_flops = config.batch * (steps * (flops["ncsnpp"].forward + flops["ncsnpp"].forward_backward)
                                     + flops["wrn"].forward_backward)
    return {"config": asdict(config), "hardware": hardware(device, config.precision), "sde_steps": steps,
            "ncsnpp_parameters": parameters, "torch_version": torch.__version__,
            "purification_seconds": purify_seconds,
            "purification_images_per_second": config.batch / purify_seconds,
            "purification_peak_extra_mib": purify_peak,
            "gradient_seconds": gradient_seconds, "gradient_peak_extra_mib": gradient_peak,
            "gradient_vs_purification": gradient_seconds / purify_seconds,
            "purification_flops_per_second": purify_flops / purify_seconds,
            "gradient_flops_per_second": gradient_flops / gradient_seconds}


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} MiB"


def format_score_sde_benchmark(result: dict) -> str:
    """The figures as lines, the hardware first."""
    config = result["config"]
    return "\n".join([
        describe_hardware(result["hardware"]),
        f"NCSN++ ({config['size']}, {result['ncsnpp_parameters']:,} parameters), VP-SDE, "
        f"{result['sde_steps']} steps, batch {config['batch']}",
        f"purification: {result['purification_seconds']:.2f} s, {result['purification_images_per_second']:.2f} img/s, "
        f"peak +{_mib(result['purification_peak_extra_mib'])}, "
        f"{result['purification_flops_per_second'] / 1e12:.3f} TFLOP/s",
        f"exact checkpointed gradient (one EOT draw): {result['gradient_seconds']:.2f} s "
        f"({result['gradient_vs_purification']:.2f}x the purification), "
        f"peak +{_mib(result['gradient_peak_extra_mib'])}, {result['gradient_flops_per_second'] / 1e12:.3f} TFLOP/s",
    ])
