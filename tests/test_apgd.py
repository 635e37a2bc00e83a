"""The apgd kind: pyautoattack's APGD on the defence's exact gradient, highest-loss iterate kept."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_images, make_tiny_victim
from distpure.attacks.pgd import PGDConfig, attack_loss, pgd
from distpure.attacks.suite import AttackConfig, craft
from distpure.defenses.defended import DefendedClassifier


@pytest.fixture
def setting():
    victim, images = make_tiny_victim(), make_tiny_images(8, seed=3)
    with torch.no_grad():
        labels = victim(images).argmax(1)
    return DefendedClassifier(victim, None), images, labels


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_stays_in_the_ball_and_raises_the_loss(setting, loss):
    defense, images, labels = setting
    adversarial = craft(AttackConfig("a", kind="apgd", steps=10, loss=loss), defense, images, labels, seed=0).examples
    assert (adversarial - images).abs().max() <= 8 / 255 + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    with torch.no_grad():
        before = attack_loss(defense(images), labels, loss)
        after = attack_loss(defense(adversarial), labels, loss)
    assert (after >= before - 1e-6).all() and after.mean() > before.mean()


def test_apgd_warm_start_keeps_at_least_the_start(setting):
    defense, images, labels = setting
    start = pgd(defense.victim, images, labels, PGDConfig(steps=5, eps=8 / 255))
    attack = AttackConfig("a", kind="apgd", steps=3, restarts=2)
    adversarial = craft(attack, defense, images, labels, seed=0, start=start).examples
    with torch.no_grad():
        from_start = attack_loss(defense(start), labels, "ce")
        reached = attack_loss(defense(adversarial), labels, "ce")
    assert (reached >= from_start - 1e-5).all()


def test_dlr_is_scale_invariant_and_apgd_refuses_other_losses(setting):
    defense, images, labels = setting
    logits = defense(images)
    assert torch.allclose(attack_loss(logits, labels, "dlr"), attack_loss(3 * logits, labels, "dlr"), atol=1e-5)
    with pytest.raises(ValueError, match="apgd loss.*'margin'"):
        AttackConfig("a", kind="apgd", steps=1, loss="margin")


def test_apgd_records_a_convergence_trace_per_iterate(setting):
    """One point per iterate (the random start and each of the steps), averaged over EOT calls
    and restarts; accuracy starts at 1 (the start is still right here) and falls."""
    defense, images, labels = setting
    result = craft(AttackConfig("a", kind="apgd", steps=6, eot=2, restarts=2, eps="64/255"), defense, images,
                   labels, seed=0)
    assert [point["step"] for point in result.trace] == list(range(7))
    assert result.trace[0]["accuracy"] == 1.0  # labels are the victim's own predictions
    assert result.trace[-1]["accuracy"] < 1.0 and result.trace[-1]["loss"] > result.trace[0]["loss"]
