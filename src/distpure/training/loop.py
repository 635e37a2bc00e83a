"""The resumable training loop shared by every trainer: progress, log, checkpoints, time budget."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from tqdm import tqdm

from ..atomic import write_atomically
from ..devices import check_precision, hardware, resolve_device, resolve_precision
from .checkpoint import load_if_exists, restore_rng_state, rng_state


@dataclass
class TrainingRunConfig:
    """Settings every resumable training run shares (trainers subclass it)."""

    data_root: str = "../shared/data/cifar10-jpeg"
    output_dir: str = "runs/train"
    steps: int = 20_000
    max_minutes: float | None = None
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        check_precision(self.precision)


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> object: ...


@dataclass
class LoopSettings:
    output_dir: Path
    steps: int
    max_minutes: float | None
    checkpoint_every: int
    description: str


def needs_loss_scaling(device: torch.device, precision: str) -> bool:
    """Whether training runs in float16 on a GPU (``auto`` there without native bf16), where
    small gradients underflow unless the loss is scaled."""
    return device.type == "cuda" and resolve_precision(precision, device) == "fp16"


def loss_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler where ``needs_loss_scaling``; a no-op otherwise (bit-identical training)."""
    return torch.amp.GradScaler(device.type, enabled=needs_loss_scaling(device, precision))


def start_run(config) -> tuple[torch.device, Path]:
    """Resolve the device, create the output folder with the run's config and hardware, seed the RNG."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    record = {**asdict(config), "hardware": hardware(device, config.precision)}
    (out / "train_config.json").write_text(json.dumps(record, indent=2))
    torch.manual_seed(config.seed)
    return device, out


def run_loop(settings: LoopSettings, state: dict[str, Stateful], train_step: Callable[[int], float],
             export: Callable[[int, float], None]) -> int:
    """Call ``train_step(step)`` until ``steps`` or the time budget is reached; checkpoint
    ``state`` (atomically, with the RNG) every ``checkpoint_every`` steps and at the end, and
    call ``export(step, seconds)`` after each checkpoint. Resumes from ``checkpoint.pt``.
    Returns the number of steps done."""
    path = settings.output_dir / "checkpoint.pt"
    step, seconds = _resume(path, state)
    started = time.monotonic() - seconds
    elapsed = lambda: time.monotonic() - started  # noqa: E731
    out_of_time = lambda: settings.max_minutes is not None and elapsed() > 60 * settings.max_minutes  # noqa: E731

    def checkpoint() -> None:
        checkpoint_state = {**{name: item.state_dict() for name, item in state.items()},
                            "rng": rng_state(), "step": step, "seconds": elapsed()}
        write_atomically(path, lambda tmp: torch.save(checkpoint_state, tmp))
        export(step, elapsed())

    with open(settings.output_dir / "log.jsonl", "a") as log, \
            tqdm(total=settings.steps, initial=step, desc=settings.description, dynamic_ncols=True) as bar:
        while step < settings.steps and not out_of_time():
            loss = train_step(step)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if step % 10 == 0:
                log.write(json.dumps({"step": step, "loss": loss, "seconds": round(elapsed(), 1)}) + "\n")
                log.flush()
            if step % settings.checkpoint_every == 0:
                checkpoint()
        checkpoint()
    return step


def _resume(path: Path, state: dict[str, Stateful]) -> tuple[int, float]:
    saved = load_if_exists(path)
    if saved is None:
        return 0, 0.0
    for name, item in state.items():
        if name in saved or item.state_dict():  # a stateless part (a disabled scaler) may be absent
            item.load_state_dict(saved[name])
    restore_rng_state(saved["rng"])
    return int(saved["step"]), float(saved["seconds"])
