"""``distpure bench-adm``: what one forward of the full 256x256 unconditional ADM costs.

The model is built from ``ADM_256_UNCOND_FLAGS`` with random weights (same architecture and
arithmetic as ``256x256_diffusion_uncond.pt``). FLOPs are counted, not timed: matrix products
and convolutions only, a multiply-add counting 2, attention counted through the math kernel
(PyTorch's fused CPU attention kernel is invisible to ``FlopCounterMode``). Memory is the growth
of the process's resident set during the forward (Linux ``VmHWM``, reset just before through
``/proc/self/clear_refs``): activations, workspaces and bf16 weight copies, beyond the weights.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from diffusers import UNet2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..defenses.recommended import RECOMMENDED
from ..devices import autocast, hardware, native_bf16
from ..models.adm import ADM_256_UNCOND_FLAGS, adm_scheduler, adm_unet_config
from ..models.diffusion import DiffusionModel
from .resources import measure, status_kib

# GPU estimate: A100 dense bf16 tensor-core peak and an assumed sustained fraction of it.
A100_BF16_FLOPS = 312e12
ASSUMED_GPU_UTILISATION = 0.4
# One exact gradient through a checkpointed reverse step: forward, recomputation, backward (~2).
GRADIENT_FORWARD_EQUIVALENTS = 4


@dataclass(frozen=True)
class EvaluationPlan:
    """A full ImageNet-30 evaluation as configs/imagenet30-*.yaml run it, on the whole test set."""

    images: int = 3000
    purifier_defenses: int = 3  # DiffPure, GDMP, victim-guided
    reverse_steps: int = field(
        default_factory=lambda: int(RECOMMENDED["imagenet30"]["purifier"].num_steps))
    attack_steps: int = 20
    eot: int = 4
    draws: int = 10  # scoring purifications per example (evaluation.draws)

    def forwards_per_image(self) -> int:
        """ADM forward-equivalents per image: clean, transfer, BPDA+EOT, PGD-EOT per defence,
        each example then scored by ``draws`` purifications."""
        k, s, e, scoring = self.reverse_steps, self.attack_steps, self.eot, self.draws * self.reverse_steps
        clean = transfer = scoring
        bpda = (s + 1) * e * k + scoring  # s steps + final loss, each e purifications
        pgd = s * e * GRADIENT_FORWARD_EQUIVALENTS * k + e * k + scoring
        return self.purifier_defenses * (clean + transfer + bpda + pgd)


@dataclass
class ADMCost:
    """Measured cost of one batch-1 forward of the full ADM, and what a full evaluation needs."""

    parameters: int
    weights_mib: float
    forward_flops: int
    threads: int
    fp32_seconds: float
    bf16_seconds: float | None
    fp32_peak_extra_mib: float | None
    bf16_peak_extra_mib: float | None
    process_peak_mib: float | None
    plan: dict
    forwards_per_evaluation: int
    cpu_days: float
    gpu_hours_estimate: float
    hardware: dict

    @property
    def cpu_precision(self) -> str:
        """The precision the CPU estimate uses: the faster one measured."""
        return "bf16" if self.bf16_seconds is not None and self.bf16_seconds < self.fp32_seconds else "fp32"


def full_adm() -> DiffusionModel:
    """The 256x256 unconditional ADM (552,814,086 parameters) with random weights, frozen."""
    torch.manual_seed(0)
    unet = UNet2DModel(**adm_unet_config(ADM_256_UNCOND_FLAGS))
    return DiffusionModel(unet, adm_scheduler(ADM_256_UNCOND_FLAGS)).eval().requires_grad_(False)


def _inputs(batch: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy 256x256 batch and its timesteps."""
    x = torch.randn(batch, 3, 256, 256, device=device)
    return x, torch.full((batch,), 100, device=device, dtype=torch.long)


def forward_flops(batch: int = 1) -> int:
    """Matmul and convolution FLOPs of one forward (counted on the meta device: no compute)."""
    with torch.device("meta"):
        unet = UNet2DModel(**adm_unet_config(ADM_256_UNCOND_FLAGS))
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(*_inputs(batch, "meta"))
    return int(counter.get_total_flops())


def time_forward(model: DiffusionModel, precision: str, batch: int = 1,
                 repeats: int = 1) -> tuple[float, float | None]:
    """Fastest of ``repeats`` no-grad forwards under ``precision`` autocast, and its memory growth."""
    x, t = _inputs(batch)

    def forward() -> None:
        with torch.no_grad(), autocast("cpu", precision):
            model(x, t)

    runs = [measure(forward) for _ in range(repeats)]
    return min(runs, key=lambda run: run[0])


def measure_adm_cost(repeats: int = 1, plan: EvaluationPlan | None = None) -> ADMCost:
    """Build the model, count its FLOPs, time fp32 and (where the CPU has it natively: emulated,
    it takes tens of minutes) bf16 forwards, derive the evaluation cost at the faster one."""
    plan = plan or EvaluationPlan()
    model = full_adm()
    parameters = sum(p.numel() for p in model.parameters())
    flops = forward_flops()
    fp32_seconds, fp32_memory = time_forward(model, "fp32", repeats=repeats)
    bf16_seconds, bf16_memory = (time_forward(model, "bf16", repeats=repeats)
                                 if native_bf16("cpu") else (None, None))
    fastest = min(seconds for seconds in (fp32_seconds, bf16_seconds) if seconds is not None)
    forwards = plan.images * plan.forwards_per_image()
    peak = status_kib("VmHWM")
    return ADMCost(
        parameters=parameters, weights_mib=parameters * 4 / 2**20, forward_flops=flops,
        threads=torch.get_num_threads(), fp32_seconds=fp32_seconds, bf16_seconds=bf16_seconds,
        fp32_peak_extra_mib=fp32_memory, bf16_peak_extra_mib=bf16_memory,
        process_peak_mib=None if peak is None else peak / 1024, plan=asdict(plan),
        forwards_per_evaluation=forwards, cpu_days=forwards * fastest / 86400,
        gpu_hours_estimate=forwards * flops / (A100_BF16_FLOPS * ASSUMED_GPU_UTILISATION) / 3600,
        hardware=hardware("cpu"))


def _mib(value: float | None) -> str:
    return "n/a (needs Linux /proc)" if value is None else f"{value:,.0f} MiB"


def format_cost(cost: ADMCost) -> str:
    """The figures as readable lines."""
    plan = cost.plan
    bf16 = ("not measured: this CPU has no native bf16" if cost.bf16_seconds is None else
            f"{cost.bf16_seconds:.2f} s, resident set +{_mib(cost.bf16_peak_extra_mib)}")
    return "\n".join([
        f"256x256 unconditional ADM, batch 1, {cost.threads} CPU thread(s), random weights",
        f"CPU                   {cost.hardware['cpu']} ({', '.join(cost.hardware['cpu_flags']) or 'no flags read'})",
        f"parameters            {cost.parameters:,} ({cost.weights_mib:,.0f} MiB in float32)",
        f"FLOPs per forward     {cost.forward_flops / 1e12:.3f} TFLOP (matmul + conv, 2 per multiply-add)",
        f"fp32 forward          {cost.fp32_seconds:.2f} s, resident set +{_mib(cost.fp32_peak_extra_mib)}",
        f"bf16 autocast forward {bf16}",
        f"process peak RSS      {_mib(cost.process_peak_mib)}",
        f"full evaluation       {plan['images']} images x {cost.forwards_per_evaluation // plan['images']:,} "
        f"forwards = {cost.forwards_per_evaluation:,} ADM forwards ({plan['purifier_defenses']} "
        f"purification defences, {plan['reverse_steps']} reverse steps, {plan['attack_steps']} "
        f"attack steps x EOT {plan['eot']})",
        f"  on this CPU ({cost.cpu_precision})  {cost.cpu_days:,.0f} days",
        f"  on one A100 (est.)  {cost.gpu_hours_estimate:,.0f} GPU-hours at "
        f"{ASSUMED_GPU_UTILISATION:.0%} of {A100_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16 (an estimate, "
        "not a measurement)",
    ])
