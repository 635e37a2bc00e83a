"""Atomic, resumable training checkpoints (plain tensors and numbers only: loadable with weights_only)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..models.weights import torch_load_weights_only


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` so that ``path`` always holds either the old or the new complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_if_exists(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (safe unpickling), or None when there is none yet.

    A torn ``path.tmp`` left by a killed save is never read: only a completed save is renamed."""
    path = Path(path)
    if not path.is_file():
        return None
    return torch_load_weights_only(path)


def rng_state() -> dict[str, torch.Tensor]:
    return {"torch": torch.get_rng_state()}


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
