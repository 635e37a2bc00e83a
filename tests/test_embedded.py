"""The embedded default defence (``load_defense("cifar10")``) on a few real CIFAR-10 test images.

Eight images only bound accuracy loosely; this checks that the shipped models load and that the
whole pipeline (victim-guided purification, then classification) classifies real images: the
victim gets most of them right, and most stay right after purification.
"""
from __future__ import annotations

import pytest
import torch

import distpure
from distpure.data import CIFAR10_CLASSES, LabelledImages, load_cifar10

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cifar10_test(require_shared) -> LabelledImages:
    root = require_shared("data/cifar10-jpeg")
    data = load_cifar10(root, split="test", n=8, seed=0, download=False)
    assert data.classes == CIFAR10_CLASSES
    return data


def test_embedded_defense_purifies_and_classifies(cifar10_test: LabelledImages) -> None:
    """On this machine 7 of 8 are right clean and 6 of 8 after purification (chance: 1)."""
    images, labels = cifar10_test.images, cifar10_test.labels
    defense = distpure.load_defense("cifar10", guidance="victim", device="cpu")
    assert defense.purifier.config.guidance == "victim"
    assert defense.purifier.guidance is not None
    assert defense.purifier.diffusion.sample_size == 32
    with torch.no_grad():
        purified = defense.purifier(images)
        clean_predictions = defense.victim(images).argmax(1)
        predictions = defense.victim(purified).argmax(1)
    assert purified.shape == images.shape and purified.dtype == torch.float32
    assert torch.isfinite(purified).all()
    # purification changes the images, but only a little (t* = 75 of 1000)
    difference = (purified - images).abs().mean()
    assert 0.0 < difference < 0.15, float(difference)
    clean_accuracy = (clean_predictions == labels).float().mean()
    accuracy = (predictions == labels).float().mean()
    assert clean_accuracy >= 0.75 and accuracy >= 0.5, (float(clean_accuracy), float(accuracy))


def test_embedded_adversarially_trained_model_resists_pgd(require_shared) -> None:
    """The shipped PGD-AT baseline keeps part of its accuracy under white-box PGD-10 at 8/255,
    where the standard victim drops to (near) zero: the weights are adversarially trained."""
    from distpure.attacks.pgd import PGDConfig, pgd

    data = load_cifar10(require_shared("data/cifar10-jpeg"), split="test", n=64, seed=3, download=False)
    attack = PGDConfig(eps=8 / 255, steps=10, seed=0)
    accuracies = {}
    for name in ("cifar10-small-resnet-at", "cifar10-resnet18"):
        model = distpure.load_classifier(name)
        adversarial = pgd(model, data.images, data.labels, attack)
        with torch.no_grad():
            accuracies[name] = [(model(x).argmax(1) == data.labels).float().mean().item()
                                for x in (data.images, adversarial)]
    clean, robust = accuracies["cifar10-small-resnet-at"]
    assert clean > 0.35 and robust > 0.15, accuracies
    assert accuracies["cifar10-resnet18"][1] < 0.05 < robust, accuracies
