"""AutoAttack (Croce & Hein 2020) through the ``pyautoattack`` package, wired for randomized
defences: its own verdict per sample is kept, and its warnings are collected, not silenced.

AutoAttack returns the clean image for every sample it did not break, including samples it
never attacked because one noisy forward already misclassified them. Those images say nothing
about robustness, so the caller gets AutoAttack's verdict (``broken``) beside the examples and
scores a broken sample as wrong in every draw.
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from pyautoattack import AutoAttack
from torch import nn

_LOGGER = logging.getLogger("auto-attack")
NORMS = {"linf": "Linf", "l2": "L2"}
VERSIONS = ("standard", "rand")
ATTACK_NAMES = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


@dataclass
class AutoAttackResult:
    """The examples (the clean image where AutoAttack found nothing), which samples AutoAttack
    broke by its own forward passes, and the warnings it raised."""

    examples: torch.Tensor
    broken: torch.Tensor
    warnings: list[str] = field(default_factory=list)


class _Collector(logging.Handler):
    """Keeps the messages of warning level and above that pyautoattack logs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _collecting_warnings() -> Iterator[list[str]]:
    """Collect pyautoattack's logged warnings (and the same ones raised as Python warnings, once)."""
    collector = _Collector()
    _LOGGER.addHandler(collector)
    try:
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            yield collector.messages
    finally:
        _LOGGER.removeHandler(collector)
    for warning in raised:
        message = str(warning.message)
        if message not in collector.messages:
            collector.messages.append(message)


def run_autoattack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, norm: str = "linf",
                   eps: float = 8 / 255, version: str = "standard", iterations: int = 100,
                   restarts: int = 1, eot_iter: int = 20, seed: int = 0, batch_size: int = 250,
                   attacks_to_run: Sequence[str] | None = None) -> AutoAttackResult:
    """Run AutoAttack's ``version`` within the ``norm`` ε-ball; ``iterations`` and ``restarts``
    set its APGD attacks, ``eot_iter`` the gradients averaged per APGD step, ``attacks_to_run``
    overrides the version's attack list."""
    if norm not in NORMS:
        raise ValueError(f"AutoAttack norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if version not in VERSIONS:
        raise ValueError(f"AutoAttack version must be one of {', '.join(VERSIONS)}, got {version!r}")
    with _collecting_warnings() as messages:
        adversary = AutoAttack(model, device=images.device, eps=eps, norm=NORMS[norm], seed=seed,
                               version=version)
        adversary.verbose = False
        for apgd in (adversary.apgd, adversary.apgd_targeted):
            apgd.n_iter, apgd.eot_iter = iterations, eot_iter
        adversary.apgd.n_restarts = restarts
        if attacks_to_run is not None:
            adversary.attacks_to_run = list(attacks_to_run)
        examples, predicted = adversary.run_standard_evaluation(images, labels, batch_size=batch_size)
    return AutoAttackResult(examples, predicted.to(labels.device) != labels, messages)
