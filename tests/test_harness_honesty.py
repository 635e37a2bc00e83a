"""The harness's guards against misleading a user of a randomized defence: one noise stream per
role, AutoAttack's verdict only where the defence is deterministic, APGD's keep-best by the EOT
mean, surrogates that get the guidance they ask for, and resumes that never mix versions."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from distpure.attacks.kinds import _EOTMeanTracker
from distpure.attacks.suite import AttackConfig, craft
from distpure.defenses.defended import DefendedClassifier
from distpure.defenses.guidance import MSEGuidance
from distpure.defenses.purifier import Purifier, PurifierConfig
from distpure.evaluation.protocol import scorers
from distpure.evaluation.resolved import check_stamps
from distpure.evaluation.rundir import RunDirectory


class _NoisyWithoutVariant(nn.Module):
    """A random purifier that cannot draw a stream of its own."""

    stochastic = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images + 0.01 * torch.randn_like(images)).clamp(0, 1)


def _purifier(diffusion, victim, **options) -> Purifier:
    return Purifier(diffusion, PurifierConfig(t_star=50, num_steps=2, precision="fp32", **options), victim=victim)


def test_a_random_defence_without_its_own_streams_is_refused(tiny_victim, tiny_images):
    defense = DefendedClassifier(tiny_victim, _NoisyWithoutVariant())
    with pytest.raises(ValueError, match="no variant"):
        scorers(defense, 4, seed=0)
    with pytest.raises(ValueError, match="no variant"):
        craft(AttackConfig("pgd", steps=1), defense, tiny_images, torch.zeros(2, dtype=torch.long), seed=0)


def test_autoattack_gives_no_verdict_on_a_randomized_defence(tiny_diffusion, tiny_victim, tiny_images):
    """Its verdict would come from one noisy forward of its own; the R draws must score instead."""
    labels = torch.zeros(len(tiny_images), dtype=torch.long)
    attack = AttackConfig("aa", kind="autoattack", steps=1, eot=1, attacks_to_run=["apgd-ce"])
    randomized = DefendedClassifier(tiny_victim, _purifier(tiny_diffusion, tiny_victim, guidance="none"))
    assert craft(attack, randomized, tiny_images, labels, seed=0).broken is None
    deterministic = DefendedClassifier(tiny_victim, None)
    assert craft(attack, deterministic, tiny_images, labels, seed=0).broken is not None


def test_apgd_keeps_the_iterate_of_highest_mean_loss_over_its_eot_draws():
    """Iterate A's losses over two draws are (10, 1), B's (3, 4): the last draw alone would keep
    B, the EOT mean keeps A."""
    losses = iter([10.0, 1.0, 3.0, 4.0])

    class Scripted(nn.Module):
        def forward(self, images):  # two classes, label 0: the CE loss is log(1 + e^z) ~ z for large z
            z = next(losses)
            return torch.tensor([[0.0, z]]).expand(len(images), 2)

    a, b = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    tracker = _EOTMeanTracker(Scripted(), a, torch.zeros(1, dtype=torch.long), "ce", eot=2)
    for images in (a, a, b, b):
        tracker(images)
    assert torch.equal(tracker.best, a)


def test_apgd_projects_a_warm_start_into_the_ball(tiny_diffusion, tiny_victim, tiny_images):
    eps = 4 / 255
    defense = DefendedClassifier(tiny_victim, None)
    start = (tiny_images + 0.2).clamp(0, 1)  # far outside the ball
    result = craft(AttackConfig("apgd", kind="apgd", eps=eps, steps=1, eot=1), defense, tiny_images,
                   torch.zeros(len(tiny_images), dtype=torch.long), seed=0, start=start)
    assert (result.examples - tiny_images).abs().max() <= eps + 1e-6


def test_a_surrogate_gets_the_guidance_it_asks_for_or_is_refused(tiny_diffusion, tiny_victim):
    custom = Purifier(tiny_diffusion, PurifierConfig(t_star=50, num_steps=2, precision="fp32"), victim=tiny_victim,
                      guidance=MSEGuidance(scale=0.5))
    assert custom.variant(checkpoint_steps=True).guidance is custom.guidance  # nothing asked of the guidance
    assert custom.variant(guidance="none").guidance is None
    with pytest.raises(ValueError, match="custom guidance object.*target"):
        custom.variant(target="straight-through")
    with pytest.raises(ValueError, match="soft_temperature"):
        custom.variant(target="soft", soft_temperature=0.3)


def test_resuming_records_of_another_version_or_precision_is_refused(tmp_path):
    files = RunDirectory(tmp_path)
    files.resolved.write_text(json.dumps({"distpure": "0.2.0"}))
    files.sessions.write_text(json.dumps({"hardware": {"resolved_precision": "bf16"}}) + "\n")
    old = [{"index": 0, "defense": "d", "attack": "a"}]  # from before records carried a stamp
    now = {"distpure": "0.3.0", "precision": "fp32"}
    with pytest.raises(ValueError, match=r"distpure 0\.2\.0 at bf16.*distpure 0\.3\.0 at fp32.*--new-resumption"):
        check_stamps(files, old, now, new_resumption=False)
    check_stamps(files, old, now, new_resumption=True)  # goes on, its records stamped apart
    check_stamps(files, [{**old[0], **now}], now, new_resumption=False)  # the same stamp resumes
