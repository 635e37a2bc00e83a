"""Named random streams: every seed in distpure is derived from a base seed and role names, so
that two roles (the attacker's noise, the scorer's draws, PGD's random start) never share one."""
from __future__ import annotations

import hashlib

import torch
from torch import nn


def derive_seed(*parts: object) -> int:
    """A 31-bit seed that depends only on ``parts`` (the same on every process and platform)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def noise_generators(*models: nn.Module | None) -> list[torch.Generator]:
    """The noise streams (``noise_generator``) of every module of ``models``, in module order:
    saved beside a computation's progress, their states let it resume with the same draws."""
    return [module.noise_generator for model in models if model is not None
            for module in model.modules() if isinstance(getattr(module, "noise_generator", None), torch.Generator)]
