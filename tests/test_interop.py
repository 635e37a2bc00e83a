"""Attack code of other libraries runs on the defended model: the Adversarial Robustness Toolbox's
PGD through a tiny victim-guided purification with frozen noise (the README's example)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from art.attacks.evasion import ProjectedGradientDescent
from art.estimators.classification import PyTorchClassifier
from torch import nn

from conftest import NUM_CLASSES, TINY_SIZE, make_tiny_diffusion, make_tiny_images, make_tiny_victim
from distpure import DefendedClassifier, Purifier, PurifierConfig

EPS = 8 / 255


def _reactive_victim() -> nn.Module:
    """The tiny random victim with its last layer scaled up and no bias: as built its logits are
    near-uniform and one class wins everywhere; scaled, predictions differ between images."""
    victim = make_tiny_victim()
    with torch.no_grad():
        victim[-1].weight.mul_(100.0)
        victim[-1].bias.zero_()
    return victim


def test_art_pgd_attacks_the_defended_classifier() -> None:
    victim = _reactive_victim()
    config = PurifierConfig(t_star=20, num_steps=2, guidance="victim", victim_scale=3.0,
                            precision="fp32", frozen_noise=True)
    defended = DefendedClassifier(victim, Purifier(make_tiny_diffusion(), config, victim=victim)).eval()
    images = make_tiny_images(8, seed=1)
    with torch.no_grad():
        labels = defended(images).argmax(1)  # clean accuracy 100 % by construction
    estimator = PyTorchClassifier(defended, loss=nn.CrossEntropyLoss(), nb_classes=NUM_CLASSES,
                                  input_shape=(3, TINY_SIZE, TINY_SIZE), clip_values=(0.0, 1.0))
    attack = ProjectedGradientDescent(estimator, norm=np.inf, eps=EPS, eps_step=2 / 255,
                                      max_iter=5, num_random_init=0, verbose=False)
    adversarial = torch.from_numpy(attack.generate(x=images.numpy(), y=labels.numpy()))

    assert (adversarial - images).abs().max() <= EPS + 1e-6
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    sign = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)).sign()
    with torch.no_grad():
        random_loss = F.cross_entropy(defended((images + EPS * sign).clamp(0, 1)), labels)
        logits = defended(adversarial)
    assert F.cross_entropy(logits, labels) > random_loss + 0.1  # gradient steps, not just noise
    assert (logits.argmax(1) == labels).float().mean() <= 0.5
