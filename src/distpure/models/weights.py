"""Safe weight loading: safetensors, or ``torch.load(weights_only=True)``; never arbitrary pickle."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint that would need unrestricted unpickling (it may execute code) was refused."""


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.pt``/``.pth``/``.bin`` file, as float32-capable CPU tensors.

    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and ``module.`` prefixes
    from DataParallel are unwrapped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch_load_weights_only(path)
    return _strip_prefix(_unwrap(state, path), "module.")


def torch_load_weights_only(path: Path) -> object:
    """``torch.load(weights_only=True)`` on CPU; a hostile or unreadable file is a ValueError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"{path}: refused to load ({_reason(error)}); the file is not a plain checkpoint of "
            "tensors, and unpickling it could execute arbitrary code. Re-save it as a plain state "
            "dict (torch.save(model.state_dict(), ...)) or as safetensors.") from error
    except Exception as error:  # a garbled file fails inside the unpickler in many ways
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: "
                         f"{str(error)[:200]})") from error


def _reason(error: Exception) -> str:
    """The specific line of torch's weights-only error (e.g. the blocked global), not its boilerplate."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    specific = [line for line in lines[1:] if not line.startswith(("Check the documentation", "Please file"))]
    return (specific or lines or [type(error).__name__])[0]


def _unwrap(state: object, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors")
    return state


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix):]: value for key, value in state.items()}
    return state


def save_state_dict(module: torch.nn.Module, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Save ``module``'s state dict as safetensors (optionally cast floating tensors to ``dtype``)."""
    from safetensors.torch import save_file

    state = {key: (value.to(dtype) if dtype is not None and value.is_floating_point() else value)
             .detach().contiguous().cpu() for key, value in module.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Save named tensors (e.g. example images) as safetensors."""
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.detach().cpu().clone().contiguous() for key, value in tensors.items()}, str(path))
