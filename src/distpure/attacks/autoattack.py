"""AutoAttack (Croce & Hein 2020) through the ``pyautoattack`` package, quiet by default."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, Literal, Sequence

import torch
from pyautoattack import AutoAttack
from torch import nn

_LOGGER = logging.getLogger("auto-attack")


@contextmanager
def _silenced(silent: bool) -> Iterator[None]:
    """Mute pyautoattack's logger (its progress and its warnings) while ``silent``."""
    previous = _LOGGER.disabled
    _LOGGER.disabled = previous or silent
    try:
        yield
    finally:
        _LOGGER.disabled = previous


def run_autoattack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   norm: Literal["Linf", "L2"] = "Linf", eps: float = 8 / 255,
                   version: Literal["standard", "rand"] = "standard", eot_iter: int = 20,
                   seed: int = 0, batch_size: int = 250,
                   attacks_to_run: Sequence[str] | None = None, verbose: bool = False) -> torch.Tensor:
    """Adversarial images within the ``norm`` ε-ball of ``images``; ``version='rand'`` averages
    ``eot_iter`` gradients per APGD step, ``attacks_to_run`` overrides the version's attack list."""
    with _silenced(not verbose):
        adversary = AutoAttack(model, device=images.device, eps=eps, norm=norm, seed=seed,
                               version=version)
        adversary.verbose = verbose
        if version == "rand":
            adversary.apgd.eot_iter = adversary.apgd_targeted.eot_iter = eot_iter
        if attacks_to_run is not None:
            adversary.attacks_to_run = list(attacks_to_run)
        adversarial, _ = adversary.run_standard_evaluation(images, labels, batch_size=batch_size)
    return adversarial
