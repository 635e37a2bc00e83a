"""``distpure train-classifier``: (adversarially) train a CIFAR-10 classifier, resumably.

``adversarial: pgd`` is PGD adversarial training (Madry et al. 2018): every batch is replaced by
PGD examples crafted against the current model, within the configured L∞ (or L2) ball.
``denoise_sigma`` trains on denoised images instead (Carlini et al. 2023's fine-tuned victim):
every batch gets N(0, σ²) noise and is replaced by the diffusion model's one-shot estimate x̂0,
the very denoising that certification's ``one-shot`` base classifier applies. ``init`` starts
from trained weights (such a fine-tune starts from the off-the-shelf victim).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.pgd import PGDConfig, pgd
from ..attacks.base import parse_epsilon
from ..certification.denoisers import DenoisedClassifier, build_base_classifier
from ..devices import autocast
from ..models.classifiers import CLASSIFIERS
from ..models.diffusion_loader import check_diffusion_name, load_diffusion
from ..models.weights import load_state_dict, save_state_dict
from ..validation import check_positive
from .batches import random_batch, training_set
from .loop import LoopSettings, TrainingRunConfig, loss_scaler, run_loop, start_run


@dataclass
class ClassifierTrainingConfig(TrainingRunConfig):
    """A classifier training run; ``adversarial`` is ``none`` or ``pgd``; ``denoise_sigma``
    (pixel units, with ``adversarial: none``) trains on batches noised at that σ and denoised
    one-shot by ``diffusion`` (any name ``load_diffusion`` takes); ``init``: the starting
    weights, a registered classifier's own or a weights file's (default: ``arch``'s own)."""

    output_dir: str = "runs/train-classifier"
    arch: str = "cifar10-small-resnet"
    adversarial: str = "pgd"
    norm: str = "linf"
    eps: float | str = "8/255"
    attack_steps: int = 5
    batch_size: int = 128
    learning_rate: float = 0.1
    weight_decay: float = 5e-4
    denoise_sigma: float | None = None
    diffusion: str = "cifar10-ddpm-small"
    init: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adversarial not in ("none", "pgd"):
            raise ValueError(f"adversarial must be 'none' or 'pgd', got {self.adversarial!r}")
        self.eps = parse_epsilon(self.eps)
        if self.denoise_sigma is not None:
            check_positive("denoise_sigma", self.denoise_sigma)
            if self.adversarial != "none":
                raise ValueError("denoise_sigma trains on denoised images, not adversarial ones: "
                                 f"set adversarial to 'none', got {self.adversarial!r}")
        check_diffusion_name(self.diffusion)
        if self.init is not None and self.init not in CLASSIFIERS and not Path(self.init).is_file():
            raise ValueError(f"init {self.init!r} is neither a registered classifier "
                             f"({', '.join(CLASSIFIERS.names())}) nor an existing weights file")


def train_classifier(config: ClassifierTrainingConfig) -> Path:
    """Train (or resume) and return the exported ``model.safetensors`` (float16)."""
    device, out = start_run(config)
    images, labels = training_set(config.data_root)
    model = initial_model(config).to(device)
    denoising = denoising_classifier(config, model, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=0.9,
                                weight_decay=config.weight_decay, nesterov=True)
    attack = PGDConfig(norm=config.norm, eps=config.eps, steps=config.attack_steps,
                       keep_best=False, step_size=2.5 * config.eps / max(1, config.attack_steps))
    scaler = loss_scaler(device, config.precision)

    def train_step(step: int) -> float:
        for group in optimizer.param_groups:
            group["lr"] = _one_cycle(step, config.steps, config.learning_rate)
        x, y = random_batch(images, labels, config.batch_size, device, crop_padding=4)
        if denoising is not None:
            x = denoised_batch(denoising, x, config.denoise_sigma)
        if config.adversarial == "pgd":
            model.eval()
            with autocast(device, config.precision):
                x = pgd(model, x, y, PGDConfig(**{**asdict(attack), "seed": step}))
        model.train()
        with autocast(device, config.precision):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.item()

    def export(step: int, seconds: float) -> None:
        save_state_dict(model, out / "model.safetensors", dtype=torch.float16)
        (out / "training_state.json").write_text(json.dumps(
            {"step": step, "wall_time_minutes": round(seconds / 60, 1),
             "images_seen": step * config.batch_size}))

    settings = LoopSettings(out, config.steps, config.max_minutes, config.checkpoint_every,
                            "train-classifier")
    run_loop(settings, {"model": model, "optimizer": optimizer, "scaler": scaler}, train_step, export)
    return out / "model.safetensors"


def initial_model(config: ClassifierTrainingConfig) -> nn.Module:
    """``arch`` with the weights ``init`` names: a registered classifier's own (its pretrained
    ones) or a weights file's; without ``init``, ``arch``'s own."""
    model = CLASSIFIERS.build(config.arch)
    if config.init is not None:
        model.load_state_dict(CLASSIFIERS.build(config.init).state_dict() if config.init in CLASSIFIERS
                              else load_state_dict(config.init))
    return model


def denoising_classifier(config: ClassifierTrainingConfig, model: nn.Module,
                         device: torch.device) -> DenoisedClassifier | None:
    """``model`` behind the one-shot denoiser at ``denoise_sigma``, built as certification
    builds its base classifier; None without ``denoise_sigma``."""
    if config.denoise_sigma is None:
        return None
    diffusion = load_diffusion(config.diffusion).to(device)
    return build_base_classifier(model, diffusion, "one-shot", config.denoise_sigma, precision=config.precision)


def denoised_batch(base: DenoisedClassifier, images: torch.Tensor, sigma: float) -> torch.Tensor:
    """``images`` plus N(0, σ²) noise in pixel units (from the global generator, so a resumed
    run draws the same), denoised by ``base`` without gradient: what its victim sees of them."""
    with torch.no_grad():
        return base.denoise(images + sigma * torch.randn_like(images))


def _one_cycle(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 20 % of steps, then cosine decay to zero."""
    warmup = max(1, total // 5)
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
