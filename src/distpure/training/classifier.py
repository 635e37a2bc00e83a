"""``distpure train-classifier``: (adversarially) train a CIFAR-10 classifier, resumably.

``adversarial: pgd`` is PGD adversarial training (Madry et al. 2018): every batch is replaced by
PGD examples crafted against the current model, within the configured L∞ (or L2) ball.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..attacks.pgd import PGDConfig, pgd
from ..attacks.base import parse_epsilon
from ..devices import autocast
from ..models.classifiers import CLASSIFIERS
from ..models.weights import save_state_dict
from .batches import random_batch, training_set
from .loop import LoopSettings, TrainingRunConfig, loss_scaler, run_loop, start_run


@dataclass
class ClassifierTrainingConfig(TrainingRunConfig):
    """A classifier training run; ``adversarial`` is ``none`` or ``pgd``."""

    output_dir: str = "runs/train-classifier"
    arch: str = "cifar10-small-resnet"
    adversarial: str = "pgd"
    norm: str = "linf"
    eps: float | str = "8/255"
    attack_steps: int = 5
    batch_size: int = 128
    learning_rate: float = 0.1
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adversarial not in ("none", "pgd"):
            raise ValueError(f"adversarial must be 'none' or 'pgd', got {self.adversarial!r}")
        self.eps = parse_epsilon(self.eps)


def train_classifier(config: ClassifierTrainingConfig) -> Path:
    """Train (or resume) and return the exported ``model.safetensors`` (float16)."""
    device, out = start_run(config)
    images, labels = training_set(config.data_root)
    model = CLASSIFIERS.build(config.arch).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=0.9,
                                weight_decay=config.weight_decay, nesterov=True)
    attack = PGDConfig(norm=config.norm, eps=config.eps, steps=config.attack_steps,
                       keep_best=False, step_size=2.5 * config.eps / max(1, config.attack_steps))
    scaler = loss_scaler(device, config.precision)

    def train_step(step: int) -> float:
        for group in optimizer.param_groups:
            group["lr"] = _one_cycle(step, config.steps, config.learning_rate)
        x, y = random_batch(images, labels, config.batch_size, device, crop_padding=4)
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


def _one_cycle(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 20 % of steps, then cosine decay to zero."""
    warmup = max(1, total // 5)
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
