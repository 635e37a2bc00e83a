"""Atomic, resumable training checkpoints (plain tensors and numbers only: loadable with weights_only)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..models.weights import torch_load_weights_only


def load_if_exists(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (safe unpickling), or None when there is none yet.

    A torn ``path.tmp`` left by a killed save is never read: only a completed save is renamed
    (``atomic.write_atomically``)."""
    path = Path(path)
    if not path.is_file():
        return None
    state = torch_load_weights_only(path)
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{path}: not a distpure training checkpoint (no step); move it away to restart")
    return state


def rng_state() -> dict[str, Any]:
    """The global CPU generator's state, and every CUDA device's when there are any."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo ``rng_state``; CUDA states are restored when the same number of devices is present."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state.get("cuda", ())) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
