"""DiffAttack's deviated-reconstruction loss: the purifier's recorded reverse states, the loss
computed from them, its exact gradient through checkpointed steps, and PGD maximising it."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_images
from distpure.attacks.deviation import DeviatedReconstruction, deviation
from distpure.attacks.pgd import PGDConfig, pgd
from distpure.attacks.suite import AttackConfig
from distpure.defenses.defended import DefendedClassifier
from distpure.defenses.purifier import Purifier, PurifierConfig, ReverseState


def _purifier(diffusion, victim, **options) -> Purifier:
    settings = {"t_star": 50, "num_steps": 3, "precision": "fp32", "guidance": "victim", "frozen_noise": True,
                **options}
    return Purifier(diffusion, PurifierConfig(**settings), victim=victim)


def test_trajectories_hold_every_reverse_state_of_every_call(tiny_diffusion, tiny_victim):
    images = make_tiny_images(4)
    whole, chunked = (_purifier(tiny_diffusion, tiny_victim, batch_size=size) for size in (4, 2))
    with whole.trajectories() as calls:
        purified = whole(images)
        whole(images)
    assert len(calls) == 2 and len(calls[0]) == 3  # two calls, three reverse steps each
    assert all(state.x.shape == images.shape for state in calls[0])
    assert float(calls[0][-1].alpha_bar) == 1.0 and float(calls[0][0].alpha_bar) < 1.0
    assert torch.allclose(((calls[0][-1].x + 1) / 2).clamp(0, 1), purified)
    with chunked.trajectories() as chunked_calls:  # chunks are merged back in row order
        chunked(images)
    assert all(torch.allclose(a.x, b.x, atol=1e-5) for a, b in zip(calls[0], chunked_calls[0]))
    assert whole._trajectories is None  # recording stops with the block


def test_deviation_is_the_mean_squared_distance_to_the_diffused_input():
    images = torch.full((1, 3, 2, 2), 0.75)  # 0.5 in [-1, 1]
    trajectory = [ReverseState(torch.zeros(1, 3, 2, 2), torch.tensor(0.25)),  # (0 - 0.5 * 0.5)^2
                  ReverseState(torch.ones(1, 3, 2, 2), torch.tensor(1.0))]    # (1 - 0.5)^2
    assert deviation(trajectory, images).tolist() == pytest.approx([(0.0625 + 0.25) / 2])


def test_deviation_gradient_through_checkpointed_steps_equals_plain(tiny_diffusion, tiny_victim):
    images = make_tiny_images(2)
    gradients = []
    for checkpoint in (False, True):
        defense = DefendedClassifier(tiny_victim, _purifier(tiny_diffusion, tiny_victim, checkpoint_steps=checkpoint))
        model = DeviatedReconstruction(defense, weight=1.0)
        x = images.clone().requires_grad_(True)
        model(x)
        gradients.append(torch.autograd.grad(model.auxiliary_loss.sum(), x)[0])
    assert gradients[0].abs().sum() > 0
    assert torch.allclose(gradients[0], gradients[1], atol=1e-5)


def test_pgd_with_the_deviation_term_raises_the_deviation(tiny_diffusion, tiny_victim):
    """λ > 0 steers PGD towards inputs the purifier reconstructs worse than plain CE PGD does."""
    images, labels = make_tiny_images(4, seed=1), torch.arange(4)
    defense = DefendedClassifier(tiny_victim, _purifier(tiny_diffusion, tiny_victim))
    measured = DeviatedReconstruction(defense, weight=1.0)
    reached = {}
    for weight in (0.0, 100.0):
        model = DeviatedReconstruction(defense, weight) if weight else defense
        adversarial = pgd(model, images, labels, PGDConfig(eps=16 / 255, steps=5, random_start=False))
        with torch.no_grad():
            measured(adversarial)
        reached[weight] = float(measured.auxiliary_loss.mean())
    assert reached[100.0] > reached[0.0]


@pytest.mark.parametrize("settings, message", [
    ({"kind": "bpda", "deviation": 1.0}, "kind 'pgd' or 'surrogate'"),
    ({"kind": "pgd", "deviation": -1.0}, "at least 0"),
])
def test_bad_deviation_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        AttackConfig("a", **settings)


def test_an_exact_attack_with_deviation_ascends_it_but_keeps_iterates_by_classification_loss(
        tiny_diffusion, tiny_victim):
    """``deviation: λ`` reaches the attack through the registry: from the same start and noise
    (frozen), the examples reached deviate more than plain PGD's, while the traced loss that
    ranks iterates is the classification loss alone (equal at the shared start)."""
    from distpure.attacks.suite import craft

    images, labels = make_tiny_images(4, seed=2), torch.arange(4)
    defense = DefendedClassifier(tiny_victim, _purifier(tiny_diffusion, tiny_victim))
    measured = DeviatedReconstruction(defense, weight=1.0)
    results = {weight: craft(AttackConfig("a", kind="pgd", steps=3, eps="16/255", deviation=weight), defense,
                             images, labels, seed=3, start=images) for weight in (0.0, 100.0)}
    assert results[100.0].trace[0]["loss"] == pytest.approx(results[0.0].trace[0]["loss"])
    reached = {}
    for weight, result in results.items():
        with torch.no_grad():
            measured(result.examples)
        reached[weight] = float(measured.auxiliary_loss.mean())
    assert reached[100.0] > reached[0.0]
