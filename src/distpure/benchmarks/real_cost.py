"""``distpure bench-flops``: FLOPs of the real CIFAR-10 setting's models (DiffPure's score-SDE
NCSN++, a WRN-28-10 victim) and, from them, what DiffPure's honest evaluation and a certification
cost on GPUs (``docs/gpu-cost.md``).

FLOPs are counted, not timed, on the meta device (no compute, no weights): matrix products and
convolutions, a multiply-add counting 2 (``torch.utils.flop_counter``, as ``distpure bench``);
normalisations and activations are not counted. A gradient is counted as it runs, backward
included, with the weights frozen (an attack needs the input's gradient only).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..data import default_data_root
from ..devices import hardware
from ..models.ncsnpp import SIGMAS_KEY, NCSNpp, NCSNppConfig, ScoreSDEModel, ncsnpp_config
from ..models.robustbench_zoo import import_robustbench
from .adm_cost import A100_BF16_FLOPS, ASSUMED_GPU_UTILISATION

#: dense bf16 tensor-core peaks assumed for the estimates (vendor figures, without sparsity)
GPU_PEAK_BF16_FLOPS = {"A100": A100_BF16_FLOPS, "H100 SXM": 989e12}
#: the fraction of purifier passes the cascade skipped in results/cifar10-honest (its report.md:
#: "58 % of the purifier passes")
HONEST_CASCADE_SKIPPED = 0.58
FULL_SPEC = "ncsnpp_ddpmpp_deep_state_dict_spec.json"
TINY_CONFIG = "ncsnpp_tiny_config.json"
#: WRN (depth, widen factor) per size: RobustBench's ``Standard`` WRN-28-10, and a tiny one
WRN_SIZES = {"full": (28, 10), "tiny": (10, 1)}


def score_sde_fixtures() -> Path:
    """``../shared/fixtures/score-sde`` (beside the data root)."""
    return default_data_root().parent / "fixtures" / "score-sde"


def ncsnpp_size_config(size: str = "full") -> NCSNppConfig:
    """The NCSN++ of DiffPure's ``checkpoint_8.pth`` (``full``, from the state-dict spec) or the
    fixture's tiny model of the same topology (``tiny``)."""
    fixtures = score_sde_fixtures()
    if size == "full":
        return ncsnpp_config(json.loads((fixtures / FULL_SPEC).read_text())["model_config"])
    if size == "tiny":
        return ncsnpp_config(json.loads((fixtures / TINY_CONFIG).read_text()))
    raise ValueError(f"size must be full or tiny, got {size!r}")


def spec_parameters() -> int:
    """The real checkpoint's parameter count, summed over its state-dict spec's shapes (the
    unused ``sigmas`` buffer left out): what a full-size build must match."""
    shapes = json.loads((score_sde_fixtures() / FULL_SPEC).read_text())["state_dict"]
    return sum(math.prod(shape) for key, shape in shapes.items() if key != SIGMAS_KEY)


def random_ncsnpp(config: NCSNppConfig, seed: int = 0) -> ScoreSDEModel:
    """An NCSN++ with ``config`` and PyTorch's default random initialisation, in eval mode."""
    torch.manual_seed(seed)
    return ScoreSDEModel(NCSNpp(config).eval(), config).eval()


def wide_resnet(size: str = "full") -> nn.Module:
    """RobustBench's CIFAR-10 WideResNet (``full``: the ``Standard`` WRN-28-10), random weights,
    frozen, in eval mode."""
    import_robustbench()
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    depth, widen = WRN_SIZES[size]
    return WideResNet(depth=depth, widen_factor=widen).eval().requires_grad_(False)


def count_flops(build: Callable[[], nn.Module], inputs: Callable[[], tuple[torch.Tensor, ...]],
                gradient: bool = False) -> int:
    """FLOPs of one forward of ``build()`` on ``inputs()`` (both made on the meta device); with
    ``gradient``, of the forward and the backward to the first input, weights frozen."""
    with torch.device("meta"):
        model = build().requires_grad_(False)
        arguments = inputs()
    arguments[0].requires_grad_(gradient)
    with sdpa_kernel(SDPBackend.MATH), torch.set_grad_enabled(gradient), \
            FlopCounterMode(display=False) as counter:
        output = model(*arguments)
        if gradient:
            output.sum().backward()  # autograd.grad trips the counter's module hooks
    return int(counter.get_total_flops())


def _ncsnpp_inputs(config: NCSNppConfig, batch: int = 1) -> Callable[[], tuple[torch.Tensor, ...]]:
    size = config.image_size
    return lambda: (torch.randn(batch, config.num_channels, size, size), torch.full((batch,), 99.9))


def _image_inputs(batch: int = 1) -> Callable[[], tuple[torch.Tensor, ...]]:
    return lambda: (torch.rand(batch, 3, 32, 32),)


@dataclass(frozen=True)
class ModelFlops:
    """FLOPs per image of one forward, and of one forward + backward to the input."""

    parameters: int
    forward: int
    forward_backward: int


def model_flops(size: str = "full") -> dict[str, ModelFlops]:
    """FLOPs of the NCSN++ and of the WRN victim of ``size``, counted at batch 1."""
    config = ncsnpp_size_config(size)
    ncsnpp = lambda: NCSNpp(config)  # noqa: E731
    wrn = lambda: wide_resnet(size)  # noqa: E731
    return {name: ModelFlops(sum(p.numel() for p in build().parameters()),
                             count_flops(build, inputs), count_flops(build, inputs, gradient=True))
            for name, build, inputs in (("ncsnpp", ncsnpp, _ncsnpp_inputs(config)),
                                        ("wrn", wrn, _image_inputs()))}


@dataclass(frozen=True)
class HonestPlan:
    """DiffPure's honest CIFAR-10 evaluation: exact PGD-EOT through every SDE step (checkpointed
    per step, as the 100-step gradient needs), every example scored by ``draws`` purifications
    ``scorings`` times (clean, the attack's final examples, its examples at the start of its last
    quarter, which judge convergence)."""

    images: int = 512
    sde_steps: int = 100
    iterations: int = 100
    eot: int = 8
    draws: int = 10
    scorings: int = 3
    cascade_skipped: float = HONEST_CASCADE_SKIPPED

    def purification_flops(self, flops: dict[str, ModelFlops]) -> int:
        """One purification and classification of one image: every SDE step, then the victim."""
        return self.sde_steps * flops["ncsnpp"].forward + flops["wrn"].forward

    def gradient_flops(self, flops: dict[str, ModelFlops]) -> int:
        """One exact checkpointed gradient of one draw: each step runs without a graph, then again
        with one and backward; the victim forward and backward once."""
        ncsnpp = flops["ncsnpp"]
        return self.sde_steps * (ncsnpp.forward + ncsnpp.forward_backward) + flops["wrn"].forward_backward

    def flops_per_image(self, flops: dict[str, ModelFlops], cascade: bool) -> dict[str, float]:
        """FLOPs per image: clean scoring (always run), the attack and its scorings (of which the
        cascade skips the measured fraction), and their sum."""
        scoring = self.draws * self.purification_flops(flops)
        attacked = self.iterations * self.eot * self.gradient_flops(flops) + (self.scorings - 1) * scoring
        kept = 1.0 - self.cascade_skipped if cascade else 1.0
        parts = {"clean_scoring": float(scoring), "attack_and_its_scoring": attacked * kept}
        return {**parts, "total": sum(parts.values())}


@dataclass(frozen=True)
class CertificationPlan:
    """Randomized smoothing with a one-shot denoiser (Carlini et al.): per draw one NCSN++ call
    and one victim forward; ``selection_draws`` pick the class, ``draws`` estimate its probability."""

    images: int = 512
    draws: int = 100_000
    selection_draws: int = 100

    def flops_per_image(self, flops: dict[str, ModelFlops]) -> float:
        """FLOPs to certify one image."""
        return float((self.draws + self.selection_draws) * (flops["ncsnpp"].forward + flops["wrn"].forward))


def gpu_hours(total_flops: float, utilisation: float = ASSUMED_GPU_UTILISATION) -> dict[str, float]:
    """Hours on one GPU of each kind at ``utilisation`` of its dense bf16 peak."""
    return {gpu: total_flops / (peak * utilisation) / 3600 for gpu, peak in GPU_PEAK_BF16_FLOPS.items()}


def real_setting_cost(utilisation: float | None = None) -> dict:
    """Every figure of ``docs/gpu-cost.md``: FLOPs per forward, per image and in all, and GPU-hours
    at ``utilisation`` of the bf16 peak (default ``ASSUMED_GPU_UTILISATION``)."""
    utilisation = ASSUMED_GPU_UTILISATION if utilisation is None else utilisation
    flops = model_flops("full")
    honest, certification = HonestPlan(), CertificationPlan()
    result = {"models": {name: asdict(value) for name, value in flops.items()},
              "ncsnpp_spec_parameters": spec_parameters(), "utilisation": utilisation,
              "gpu_peak_bf16_flops": GPU_PEAK_BF16_FLOPS,
              "honest_plan": asdict(honest), "certification_plan": asdict(certification),
              "purification_flops": honest.purification_flops(flops),
              "gradient_flops": honest.gradient_flops(flops), "hardware": hardware("cpu")}
    for cascade in (False, True):
        per_image = honest.flops_per_image(flops, cascade)
        total = per_image["total"] * honest.images
        result[f"honest_{'cascade' if cascade else 'no_cascade'}"] = {
            "per_image_flops": per_image, "total_flops": total, "gpu_hours": gpu_hours(total, utilisation)}
    per_image = certification.flops_per_image(flops)
    total = per_image * certification.images
    result["certification"] = {"per_image_flops": per_image, "total_flops": total,
                               "gpu_hours": gpu_hours(total, utilisation)}
    return result


def format_real_cost(result: dict) -> str:
    """The figures as lines: FLOPs per model, then GPU-hours per plan and GPU."""
    lines = [f"FLOPs counted on the meta device (matmul + conv, 2 per multiply-add); "
             f"written on {result['hardware']['cpu']}"]
    for name, model in result["models"].items():
        lines.append(f"{name:7} {model['parameters']:>12,} parameters, {model['forward'] / 1e9:8.2f} GFLOP "
                     f"forward, {model['forward_backward'] / 1e9:8.2f} GFLOP forward + backward (per image)")
    for key in ("honest_no_cascade", "honest_cascade", "certification"):
        plan = result[key]
        hours = ", ".join(f"{gpu} {value:,.0f} h" for gpu, value in plan["gpu_hours"].items())
        lines.append(f"{key:18} {plan['total_flops'] / 1e18:8.2f} EFLOP -> {hours} at "
                     f"{result['utilisation']:.0%} of the bf16 peak")
    return "\n".join(lines)
