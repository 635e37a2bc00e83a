"""CUDA against CPU, on the tiny models: purification, the exact checkpointed gradient, an attack
and scoring at every precision ``auto`` can pick on a GPU (bf16 where the GPU has it natively,
else fp16), each compared with the CPU's fp32 result within that precision's tolerance; and the
GPU memory of a 100-step checkpointed gradient against a 10-step one.

Every test is marked ``cuda`` and skips without a GPU. The noise is drawn on the CPU from seeded
generators, so both devices purify with the same draws. The tolerances are not yet checked on a
GPU (``scripts/gpu-check`` runs these first on a lent one). They sit well above the error of the
same precision emulated on a CPU (``cuda_errors(p, device="cpu")`` on an AMD EPYC Zen 3: bf16
image 2.6e-4, cosine 0.99978, logits 1.0e-5, attack loss 1.5e-5; fp16 3.4e-5, 0.99987, 2.1e-6,
1.9e-6), leaving room for GPU kernels (fp32 layers such as the victim's convolutions run in TF32
by default). Certification: CERTIFY's class counts through the one-shot and multistep
denoisers (the draws come from CPU generators, so both devices classify the same noisy images),
and SmoothAdv's example through the denoiser, on the GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_diffusion, make_tiny_images, make_tiny_victim
from distpure.attacks.pgd import PGDConfig, eot_loss_and_gradient, pgd
from distpure.attacks.smoothadv import SmoothAdv, SmoothAdvConfig
from distpure.benchmarks.resources import measure
from distpure.certification.denoisers import build_base_classifier
from distpure.defenses.defended import DefendedClassifier
from distpure.defenses.purifier import Purifier, PurifierConfig
from distpure.devices import native_bf16
from distpure.evaluation.protocol import scorers

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

IMAGES = 8


@dataclass(frozen=True)
class Tolerance:
    """How far a result at one precision may be from the CPU's fp32 one."""

    image: float  # mean |difference| of purified pixels in [0, 1]
    cosine: float  # least cosine similarity of an input gradient (per image)
    logits: float  # largest |difference| of a scoring draw's logit
    attack_loss: float  # largest |difference| of the attack's final loss per image


TOLERANCES = {"bf16": Tolerance(image=2e-3, cosine=0.99, logits=1e-2, attack_loss=2e-2),
              "fp16": Tolerance(image=5e-4, cosine=0.995, logits=5e-3, attack_loss=1e-2)}


def gpu_precisions() -> list:
    """The precisions ``auto`` can resolve to on a GPU, each skipped where this GPU lacks it."""
    no_bf16 = torch.cuda.is_available() and not native_bf16("cuda")
    return [pytest.param("bf16", marks=pytest.mark.skipif(no_bf16, reason="this GPU has no native bf16")),
            "fp16"]


def tiny_defense(device: str, precision: str, **options) -> DefendedClassifier:
    """The tiny victim behind a victim-guided purifier (t* = 50, 5 steps, scale 3) on ``device``."""
    victim = make_tiny_victim().to(device)
    config = PurifierConfig(t_star=50, num_steps=5, guidance="victim", victim_scale=3.0,
                            precision=precision, **options)
    return DefendedClassifier(victim, Purifier(make_tiny_diffusion().to(device), config, victim=victim))


def _inputs(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(IMAGES) % 10
    return make_tiny_images(IMAGES).to(device), labels.to(device)


def purified(device: str, precision: str) -> torch.Tensor:
    """The tiny images purified once, seed 0."""
    with torch.no_grad():
        return tiny_defense(device, precision).purifier(_inputs(device)[0]).cpu()


def exact_gradient(device: str, precision: str, checkpointed: bool) -> torch.Tensor:
    """The exact input gradient of the cross-entropy through the frozen-noise defence."""
    defense = tiny_defense(device, precision, frozen_noise=True, checkpoint_steps=checkpointed)
    return eot_loss_and_gradient(defense, *_inputs(device), PGDConfig())[1].cpu()


def attack_losses(device: str, precision: str) -> torch.Tensor:
    """Per image, the CPU fp32 loss of the examples PGD (5 steps) crafts through the frozen-noise
    defence on ``device`` at ``precision``: how strong an attack run there is, judged alike."""
    images, labels = _inputs(device)
    examples = pgd(tiny_defense(device, precision, frozen_noise=True), images, labels,
                   PGDConfig(steps=5, random_start=False)).cpu()
    judge = tiny_defense("cpu", "fp32", frozen_noise=True)
    with torch.no_grad():
        return F.cross_entropy(judge(examples), labels.cpu(), reduction="none")


def scoring_logits(device: str, precision: str, draws: int = 4) -> torch.Tensor:
    """draws x images x classes: the logits of the scoring draws (fresh noise, seeded)."""
    images = _inputs(device)[0]
    with torch.no_grad():
        return torch.stack([model(images).float().cpu() for model in scorers(tiny_defense(device, precision),
                                                                              draws, seed=3)])


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, the cosine similarity of two gradients."""
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def cuda_errors(precision: str, device: str = "cuda") -> dict[str, float]:
    """Each comparison's error against the CPU's fp32 result (``device="cpu"`` measures the
    precision's own rounding, emulated, which set the tolerances)."""
    checkpointed = exact_gradient(device, precision, checkpointed=True)
    reference_logits = scoring_logits("cpu", "fp32")
    return {"image": (purified(device, precision) - purified("cpu", "fp32")).abs().mean().item(),
            "cosine": cosines(checkpointed, exact_gradient("cpu", "fp32", checkpointed=True)).min().item(),
            "logits": (scoring_logits(device, precision) - reference_logits).abs().max().item(),
            "attack_loss": (attack_losses(device, precision) - attack_losses("cpu", "fp32")).abs().max().item()}


@pytest.mark.parametrize("precision", gpu_precisions())
def test_purification_matches_cpu(precision):
    error = (purified("cuda", precision) - purified("cpu", "fp32")).abs().mean().item()
    assert error <= TOLERANCES[precision].image, error


@pytest.mark.parametrize("precision", gpu_precisions())
def test_exact_checkpointed_gradient_matches_cpu_and_the_plain_one(precision):
    checkpointed = exact_gradient("cuda", precision, checkpointed=True)
    assert cosines(checkpointed, exact_gradient("cpu", "fp32", checkpointed=True)).min() >= TOLERANCES[precision].cosine
    # on the GPU, rebuilding each step in the backward pass gives the plain autograd gradient
    assert cosines(checkpointed, exact_gradient("cuda", precision, checkpointed=False)).min() >= 0.999


@pytest.mark.parametrize("precision", gpu_precisions())
def test_attack_matches_cpu(precision):
    on_gpu, on_cpu = attack_losses("cuda", precision), attack_losses("cpu", "fp32")
    assert (on_gpu - on_cpu).abs().max() <= TOLERANCES[precision].attack_loss, (on_gpu, on_cpu)


@pytest.mark.parametrize("precision", gpu_precisions())
def test_scoring_matches_cpu(precision):
    """Every scoring draw's logits agree, so its prediction does wherever the CPU's top two
    classes are further apart than the two devices can differ."""
    on_gpu, on_cpu = scoring_logits("cuda", precision), scoring_logits("cpu", "fp32")
    tolerance = TOLERANCES[precision].logits
    assert (on_gpu - on_cpu).abs().max() <= tolerance
    top2 = on_cpu.topk(2, dim=-1).values
    clear = top2[..., 0] - top2[..., 1] > 2 * tolerance
    assert clear.any()
    assert torch.equal(on_gpu.argmax(-1)[clear], on_cpu.argmax(-1)[clear])


def _gradient_peak_mib(steps: int, checkpointed: bool) -> float:
    """Peak growth of allocated GPU memory (``torch.cuda.max_memory_allocated``) during one exact
    gradient through a victim-guided purification of 8 tiny images with ``steps`` reverse steps
    from t* = 100."""
    defense = tiny_defense("cuda", "auto", t_star=100, num_steps=steps, checkpoint_steps=checkpointed)
    images, labels = _inputs("cuda")
    return measure(lambda: eot_loss_and_gradient(defense, images, labels, PGDConfig()), "cuda")[1]


def test_checkpointed_gradient_memory_does_not_grow_with_steps_on_gpu():
    """100 checkpointed steps need at most 1.5x the GPU memory of 10; plain autograd at 100 steps
    needs several times more (the measurement sees growth where there is some)."""
    peaks = {(steps, checkpointed): _gradient_peak_mib(steps, checkpointed)
             for steps, checkpointed in ((10, True), (100, True), (100, False))}
    assert peaks[100, True] <= 1.5 * peaks[10, True], peaks
    assert peaks[100, False] > 3 * peaks[100, True], peaks


def smoothed_base_probabilities(device: str, precision: str, kind: str) -> torch.Tensor:
    """The base classifier's class probabilities behind ``kind`` at σ = 0.25 on 4 noisy copies of
    each tiny image (noise and the denoiser's own draws from seeded CPU generators)."""
    base = build_base_classifier(make_tiny_victim().to(device), make_tiny_diffusion().to(device), kind, 0.25,
                                 steps=2, precision=precision)
    base.reseed(0)
    images = _inputs("cpu")[0].repeat(4, 1, 1, 1)
    noisy = images + 0.25 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return base.probabilities(noisy.to(device)).float().cpu()


@pytest.mark.parametrize("kind", ["one-shot", "multistep"])
@pytest.mark.parametrize("precision", gpu_precisions())
def test_certification_base_classifier_matches_cpu(precision, kind):
    """What CERTIFY counts: the denoised draws' log-probabilities agree within the precision's
    logit tolerance, and so do their classes wherever the CPU's top two are clearly apart."""
    on_gpu = smoothed_base_probabilities("cuda", precision, kind).log()
    on_cpu = smoothed_base_probabilities("cpu", "fp32", kind).log()
    tolerance = TOLERANCES[precision].logits
    assert (on_gpu - on_cpu).abs().max() <= tolerance
    top2 = on_cpu.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * tolerance
    assert clear.any()
    assert torch.equal(on_gpu.argmax(-1)[clear], on_cpu.argmax(-1)[clear])


@pytest.mark.parametrize("precision", gpu_precisions())
def test_smoothadv_runs_through_the_denoiser_on_gpu(precision):
    """SmoothAdv's exact gradient through the one-shot denoiser on the GPU: an example on the
    GPU, in the ball and in the box."""
    base = build_base_classifier(make_tiny_victim().cuda(), make_tiny_diffusion().cuda(), "one-shot", 0.25,
                                 precision=precision)
    images, labels = _inputs("cuda")
    result = SmoothAdv(SmoothAdvConfig(epsilon=0.5, steps=3, m=4), 0.25).perturb(base, images[:2], labels[:2], seed=0)
    assert result.examples.device.type == "cuda"
    assert float((result.examples - images[:2]).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-4
    assert 0 <= float(result.examples.min()) and float(result.examples.max()) <= 1
