"""``distpure train-diffusion``: train a small DDPM on an image folder, resumably, on CPU or GPU.

Purification only visits small noise levels, so training may restrict timesteps to
``[0, max_timestep)``; the schedule itself stays the standard 1000-step linear one.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import load_cifar10
from ..devices import autocast, resolve_device
from ..models.diffusion import DiffusionModel, default_scheduler, small_unet
from .checkpoint import load_if_exists, restore_rng_state, rng_state, save_atomic
from .ema import EMA


@dataclass
class DiffusionTrainingConfig:
    """Everything that defines a training run; stored in the checkpoint and the output folder."""

    data_root: str = "../shared/data/cifar10-jpeg"
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
    max_minutes: float | None = None
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "auto"
    precision: str = "bf16"
    extra: dict = field(default_factory=dict)


def train_diffusion(config: DiffusionTrainingConfig) -> Path:
    """Train (or resume) and return the directory of the exported EMA model."""
    device = resolve_device(config.device)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(config), indent=2))
    torch.manual_seed(config.seed)

    images = _training_images(config.data_root)
    unet = small_unet(32, config.channels, config.layers_per_block, config.attention).to(device)
    scheduler = default_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=0.0)
    ema = EMA(unet, config.ema_decay)
    step, elapsed = _resume(out / "checkpoint.pt", unet, optimizer, ema)

    started = time.monotonic() - elapsed
    progress = tqdm(total=config.steps, initial=step, desc="train-diffusion", dynamic_ncols=True)
    log = open(out / "log.jsonl", "a")
    while step < config.steps and not _out_of_time(config, started):
        lr = config.learning_rate * min(1.0, (step + 1) / config.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = _train_step(unet, optimizer, images, alphas_cumprod, config, device)
        ema.update(unet)
        step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}")
        if step % 10 == 0:
            log.write(json.dumps({"step": step, "loss": loss, "lr": lr,
                                  "seconds": round(time.monotonic() - started, 1)}) + "\n")
            log.flush()
        if step % config.checkpoint_every == 0:
            _checkpoint(out, unet, optimizer, ema, scheduler, step, time.monotonic() - started, config)
    _checkpoint(out, unet, optimizer, ema, scheduler, step, time.monotonic() - started, config)
    progress.close()
    log.close()
    return out / "ema"


def _training_images(root: str) -> torch.Tensor:
    """All training images as uint8 (cheap to keep in memory: 150 MB for CIFAR-10)."""
    data = load_cifar10(root, split="train")
    return (data.images * 255).round().to(torch.uint8)


def _train_step(unet, optimizer, images, alphas_cumprod, config, device) -> float:
    index = torch.randint(0, len(images), (config.batch_size,))
    x0 = images[index].to(device).float().div(127.5).sub(1.0)
    flip = torch.rand(config.batch_size, device=device) < 0.5
    x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
    t = torch.randint(0, config.max_timestep, (config.batch_size,), device=device)
    noise = torch.randn_like(x0)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with autocast(device, config.precision):
        prediction = unet(x_t, t).sample
    loss = F.mse_loss(prediction.float(), noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    optimizer.step()
    return float(loss)


def _out_of_time(config: DiffusionTrainingConfig, started: float) -> bool:
    return config.max_minutes is not None and time.monotonic() - started > 60 * config.max_minutes


def _resume(path: Path, unet, optimizer, ema: EMA) -> tuple[int, float]:
    state = load_if_exists(path)
    if state is None:
        return 0, 0.0
    unet.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    ema.load_state_dict(state["ema"])
    restore_rng_state(state["rng"])
    return int(state["step"]), float(state["seconds"])


def _checkpoint(out: Path, unet, optimizer, ema: EMA, scheduler, step: int, seconds: float,
                config: DiffusionTrainingConfig) -> None:
    save_atomic({"model": unet.state_dict(), "optimizer": optimizer.state_dict(),
                 "ema": ema.state_dict(), "rng": rng_state(), "step": step,
                 "seconds": seconds}, out / "checkpoint.pt")
    DiffusionModel(ema.shadow, scheduler).save_pretrained(out / "ema", dtype=torch.float16)
    (out / "ema" / "training_state.json").write_text(json.dumps(
        {"step": step, "wall_time_minutes": round(seconds / 60, 1),
         "images_seen": step * config.batch_size, "max_timestep": config.max_timestep}))
