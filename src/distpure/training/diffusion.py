"""``distpure train-diffusion``: train a small DDPM on an image folder, resumably, on CPU or GPU.

Purification only visits small noise levels, so training may restrict timesteps to
``[0, max_timestep)``; the schedule itself stays the standard 1000-step linear one. ``init_from``
fine-tunes a trained model of the same architecture (e.g. the embedded default), and
``lr_schedule: cosine`` decays the learning rate to 0 at ``steps``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..devices import autocast
from ..models.diffusion import DiffusionModel, default_scheduler, small_unet
from ..models.diffusion_loader import load_diffusion
from ..validation import check_choice
from .batches import random_batch, training_set
from .ema import EMA
from .loop import LoopSettings, TrainingRunConfig, loss_scaler, run_loop, start_run


@dataclass
class DiffusionTrainingConfig(TrainingRunConfig):
    """Everything that defines a diffusion training run; stored in the output folder."""

    output_dir: str = "runs/train-diffusion"
    channels: tuple[int, ...] = (64, 128, 256)
    layers_per_block: int = 1
    attention: bool = False
    max_timestep: int = 300
    batch_size: int = 64
    learning_rate: float = 4e-4
    warmup_steps: int = 250
    ema_decay: float = 0.999
    steps: int = 100_000
    lr_schedule: str = "constant"
    init_from: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(config: DiffusionTrainingConfig, step: int) -> float:
    """Linear warm-up to ``learning_rate``, then constant, or cosine decay to 0 at ``steps``."""
    warm = min(1.0, (step + 1) / config.warmup_steps)
    if config.lr_schedule == "constant":
        return config.learning_rate * warm
    progress = min(1.0, max(0.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)))
    return config.learning_rate * warm * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_diffusion(config: DiffusionTrainingConfig) -> Path:
    """Train (or resume) and return the directory of the exported EMA model."""
    device, out = start_run(config)

    images, labels = training_set(config.data_root)
    unet = small_unet(32, config.channels, config.layers_per_block, config.attention).to(device)
    if config.init_from is not None:  # fine-tune a trained model (a checkpoint of this run still wins)
        unet.load_state_dict(load_diffusion(config.init_from).unet.state_dict())
    scheduler = default_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=0.0)
    ema = EMA(unet, config.ema_decay)
    scaler = loss_scaler(device, config.precision)

    def train_step(step: int) -> float:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        batch, _ = random_batch(images, labels, config.batch_size, device)
        loss = _train_step(unet, optimizer, scaler, batch * 2.0 - 1.0, alphas_cumprod, config)
        ema.update(unet)
        return loss

    def export(step: int, seconds: float) -> None:
        DiffusionModel(ema.shadow, scheduler).save_pretrained(out / "ema", dtype=torch.float16)
        (out / "ema" / "training_state.json").write_text(json.dumps(
            {"step": step, "wall_time_minutes": round(seconds / 60, 1),
             "images_seen": step * config.batch_size, "max_timestep": config.max_timestep}))

    settings = LoopSettings(out, config.steps, config.max_minutes, config.checkpoint_every,
                            "train-diffusion")
    run_loop(settings, {"model": unet, "optimizer": optimizer, "ema": ema, "scaler": scaler}, train_step, export)
    return out / "ema"


def _train_step(unet, optimizer, scaler: torch.amp.GradScaler, x0: torch.Tensor,
                alphas_cumprod: torch.Tensor, config: DiffusionTrainingConfig) -> float:
    """One ε-prediction step on clean images ``x0`` in [-1, 1] at t ~ U[0, max_timestep)."""
    device = x0.device
    t = torch.randint(0, config.max_timestep, (config.batch_size,), device=device)
    noise = torch.randn_like(x0)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with autocast(device, config.precision):
        prediction = unet(x_t, t).sample
    loss = F.mse_loss(prediction.float(), noise)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    scaler.step(optimizer)
    scaler.update()
    return loss.item()
