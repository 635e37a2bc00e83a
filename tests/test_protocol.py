"""The evaluation protocol cannot flatter a randomized defence: attacker and scorer attack and
score the same defence, never share a noise stream, frozen noise is keyed by sample, AutoAttack's
verdict is kept, transfer examples are keyed by the model they came from, and a resumed run
cannot mix two defences. Each test fails on the harness as it was before the protocol issue."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from conftest import make_tiny_images
from distpure.attacks import pgd as pgd_module
from distpure.attacks.autoattack import run_autoattack
from distpure.attacks.base import ATTACKS, Attack, Crafted
from distpure.attacks.suite import AttackConfig, craft
from distpure.defenses.defended import DefendedClassifier
from distpure.defenses.purifier import Purifier, PurifierConfig
from distpure.seeding import derive_seed
from distpure.evaluation.protocol import outcome, predict_draws, scorers


def _defense(diffusion, victim, votes: int = 1, **options) -> DefendedClassifier:
    settings = dict(t_star=50, num_steps=3, precision="fp32", guidance="victim", **options)
    return DefendedClassifier(victim, Purifier(diffusion, PurifierConfig(**settings), victim=victim), votes)


def test_a_variant_without_a_seed_draws_its_own_stream(tiny_diffusion, tiny_victim, tiny_images):
    """The README's attack example: the attacker's copy must not replay the scorer's draws."""
    purifier = _defense(tiny_diffusion, tiny_victim).purifier
    attacker = purifier.variant(checkpoint_steps=True)
    second = purifier.variant(checkpoint_steps=True)
    with torch.no_grad():
        scored, attacked, again = purifier(tiny_images), attacker(tiny_images), second(tiny_images)
    assert attacker.config.seed != purifier.config.seed != second.config.seed != attacker.config.seed
    assert not torch.equal(scored, attacked) and not torch.equal(attacked, again)
    same = purifier.variant(checkpoint_steps=True, seed=purifier.config.seed)
    fresh = Purifier(purifier.diffusion, purifier.config, victim=tiny_victim)
    with torch.no_grad():
        assert torch.equal(same(tiny_images), fresh(tiny_images))  # an explicit seed is kept


def test_frozen_noise_is_keyed_by_sample_not_position(tiny_diffusion, tiny_victim):
    """AutoAttack calls the defence on subsets of a batch: a sample must see its own noise."""
    images = make_tiny_images(3, seed=1)
    frozen = _defense(tiny_diffusion, tiny_victim, frozen_noise=True).purifier.bind_samples(images, [7, 8, 9])
    with torch.no_grad():
        whole = frozen(images)
        reordered = frozen(images[[2, 0]])
        perturbed = frozen((images[[1]] + 2 / 255).clamp(0, 1))  # an adversarial example of sample 8
        unbound = frozen.variant(seed=123, frozen_noise=True)
    assert torch.equal(reordered, whole[[2, 0]])
    assert not torch.equal(perturbed, whole[[1]]) and (perturbed - whole[[1]]).abs().mean() < 0.05
    assert unbound._samples is None  # another seed is another defence: the binding does not carry over
    with pytest.raises(ValueError, match="frozen_noise=True"):
        _defense(tiny_diffusion, tiny_victim).purifier.bind_samples(images, [1, 2, 3])


def attacked_model(attack: AttackConfig, defense: DefendedClassifier, seed: int) -> nn.Module:
    return ATTACKS.build(attack.kind, config=attack).attacked_model(defense, seed)


def test_attacker_attacks_the_scored_votes(tiny_diffusion, tiny_victim):
    defense = _defense(tiny_diffusion, tiny_victim, votes=3)
    for kind in ("pgd", "bpda", "surrogate"):
        model = attacked_model(AttackConfig("a", kind=kind, surrogate={"num_steps": 2} if kind == "surrogate" else {}),
                               defense, seed=5)
        assert isinstance(model, DefendedClassifier) and model.votes == 3
        assert model.victim is defense.victim


def test_attacker_and_scorer_streams_differ_and_frozen_noise_is_shared(tiny_diffusion, tiny_victim, tiny_images):
    defense = _defense(tiny_diffusion, tiny_victim)
    labels = torch.zeros(len(tiny_images), dtype=torch.long)
    fresh = AttackConfig("fresh", steps=1)
    scoring = scorers(defense, draws=3, seed=11)
    attacker = attacked_model(fresh, defense, seed=11)
    with torch.no_grad():
        views = [model.purifier(tiny_images) for model in scoring] + [attacker.purifier(tiny_images)]
    assert all(not torch.equal(a, b) for i, a in enumerate(views) for b in views[i + 1:])
    frozen_attack = AttackConfig("frozen", steps=1, frozen_noise=True)
    result = craft(frozen_attack, defense, tiny_images, labels, seed=11, sample_keys=[4, 5])
    assert scorers(defense, 3, 11, result.frozen_scorer) == [result.frozen_scorer]
    frozen_attacker = attacked_model(frozen_attack, result.frozen_scorer, seed=11)
    with torch.no_grad():
        assert torch.equal(frozen_attacker.purifier(tiny_images), result.frozen_scorer.purifier(tiny_images))
    # the frozen draw is its own stream, not PGD's random start: another start, the same draw
    moved = AttackConfig("frozen", steps=1, frozen_noise=True, eps="4/255")
    other = craft(moved, defense, tiny_images, labels, seed=11, sample_keys=[4, 5])
    assert other.frozen_scorer.purifier.config.seed == result.frozen_scorer.purifier.config.seed
    assert result.frozen_scorer.purifier.config.seed == derive_seed(11, "frozen-noise")
    assert result.frozen_scorer.purifier.config.seed != derive_seed(11, "pgd-start")


def test_fresh_scorers_replay_the_same_draws(tiny_diffusion, tiny_victim, tiny_images):
    """Scorers built again from the same seed purify with the same noise: the runner's paired
    scorings (late and start examples beside the final ones) rest on this."""
    defense = _defense(tiny_diffusion, tiny_victim)
    with torch.no_grad():
        first = [model.purifier(tiny_images) for model in scorers(defense, draws=3, seed=7)]
        again = [model.purifier(tiny_images) for model in scorers(defense, draws=3, seed=7)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])


def test_deterministic_defences_are_scored_once(tiny_victim, tiny_images):
    plain = DefendedClassifier(tiny_victim, None)
    assert scorers(plain, draws=8, seed=0) == [plain]
    predictions = predict_draws(scorers(plain, 8, 0), tiny_images)
    assert [len(p) for p in predictions] == [1, 1]


class _Noisy(nn.Module):
    """Class 0 for bright images, class 1 for dark ones (margins far beyond 8/255), plus noise:
    a randomized model whose dark image AutoAttack's first check calls wrong."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        brightness = images.mean(dim=(1, 2, 3)) - 0.5
        logits = 40.0 * brightness[:, None] * torch.tensor([1.0, -1.0])
        return logits + 0.01 * torch.randn_like(logits)


def test_autoattack_keeps_its_verdict_and_its_warnings():
    """Before: the clean image came back for a sample AutoAttack did not attack because a
    forward already called it wrong, and the scorer then counted it robust whenever its fresh
    draws were right; AutoAttack's warnings (here: a randomized model) were silenced."""
    images = torch.stack([torch.full((3, 16, 16), 0.2), torch.full((3, 16, 16), 0.8)])
    labels = torch.zeros(2, dtype=torch.long)
    result = run_autoattack(_Noisy(), images, labels, eps=8 / 255, attacks_to_run=["apgd-ce"], iterations=2)
    assert torch.equal(result.examples, images)  # nothing crafted: clean images came back
    assert result.broken.tolist() == [True, False]
    fresh_draws_right = {"index": 0, "label": 0, "predictions": [0, 0, 0]}
    assert outcome(fresh_draws_right).worst and not outcome({**fresh_draws_right, "verdict": "broken"}).worst
    assert any("randomized defense" in message for message in result.warnings)
    assert logging.getLogger("auto-attack").handlers == []  # the collector is removed again


def test_autoattack_defaults_for_randomized_defences():
    rand = AttackConfig("aa", kind="autoattack", version="rand")
    assert (rand.eot_draws, rand.iterations) == (20, 100)
    assert AttackConfig("aa", kind="autoattack", version="rand", eot=4).eot_draws == 4
    assert AttackConfig("p").eot_draws == 1 and AttackConfig("p").iterations == 20


def test_an_attack_kind_is_one_registered_class(tiny_victim, tiny_images):
    """Adding an attack is a class registered by name: configs accept its kind, ``craft`` runs it."""

    @ATTACKS.register("test-corner")
    class Corner(Attack):
        """Moves every pixel by ε toward the nearer end of [0, 1]."""

        def perturb(self, defense, images, labels, seed, start=None, sample_keys=None, frozen_seed=None,
                    progress=None):
            step = torch.where(images < 0.5, -self.config.eps, self.config.eps)
            return Crafted((images + step).clamp(0, 1))

    labels = torch.zeros(len(tiny_images), dtype=torch.long)
    result = craft(AttackConfig("corner", kind="test-corner"), DefendedClassifier(tiny_victim, None),
                   tiny_images, labels, seed=0)
    assert (result.examples - tiny_images).abs().max() == pytest.approx(8 / 255)
    with pytest.raises(ValueError, match="test-corner"):
        AttackConfig("typo", kind="test-cornr")


def test_stochastic_preprocessing_draws_streams_of_its_own(tiny_victim, tiny_images):
    from distpure.defenses.preprocessing import build_preprocessing

    defense = DefendedClassifier(tiny_victim, build_preprocessing("resize-pad", scale=1.5))
    draws = scorers(defense, draws=3, seed=2)
    attacker = attacked_model(AttackConfig("p"), defense, seed=2)
    seeds = [model.purifier.seed for model in draws] + [attacker.purifier.seed]
    assert len(set(seeds)) == 4 and defense.purifier.seed not in seeds
    with pytest.raises(ValueError, match="frozen_noise needs a diffusion purifier"):
        craft(AttackConfig("f", steps=1, frozen_noise=True), defense, tiny_images,
              torch.zeros(2, dtype=torch.long), seed=0)


def test_frozen_attacks_of_one_defence_meet_one_draw(tiny_diffusion, tiny_victim, tiny_images):
    """The frozen threat group's worst case is over attacks of the same fixed draw."""
    defense, labels = _defense(tiny_diffusion, tiny_victim), torch.zeros(2, dtype=torch.long)
    first = craft(AttackConfig("a", steps=1, frozen_noise=True), defense, tiny_images, labels, seed=1,
                  sample_keys=[3, 4], frozen_seed=99)
    second = craft(AttackConfig("b", kind="bpda", steps=1, frozen_noise=True), defense, tiny_images, labels,
                   seed=2, sample_keys=[3, 4], frozen_seed=99)
    with torch.no_grad():
        assert torch.equal(first.frozen_scorer.purifier(tiny_images), second.frozen_scorer.purifier(tiny_images))


@pytest.mark.parametrize("surrogate", [{"seed": 5}, {"frozen_noise": True}, {"checkpoint_steps": False}])
def test_a_surrogate_cannot_change_the_threat_model(surrogate):
    with pytest.raises(ValueError, match="cannot be changed"):
        AttackConfig("s", kind="surrogate", surrogate=surrogate)


def test_holdout_judged_attacks_run_on_a_randomized_defence(tiny_diffusion, tiny_victim, tiny_images, monkeypatch):
    """``holdout_draws`` judges iterates with held-out draws of the scored defence itself."""
    defense = _defense(tiny_diffusion, tiny_victim)
    labels = torch.arange(len(tiny_images))
    judged = []

    def recording(judge, x, labels, draws):
        judged.append((judge, draws))
        return fooled(judge, x, labels, draws)

    fooled = pgd_module._fooled
    monkeypatch.setattr(pgd_module, "_fooled", recording)
    result = craft(AttackConfig("a", kind="pgd", steps=2, holdout_draws=2), defense, tiny_images, labels, seed=1)
    assert result.examples.shape == tiny_images.shape and len(result.trace) == 3
    assert len(judged) == 3 and all(draws == 2 for _, draws in judged)  # the start and each step, two draws
    seeds = {judge.purifier.config.seed for judge, _ in judged}
    assert seeds == {derive_seed(1, "holdout")}  # the scored defence with held-out noise of its own
    assert all(judge.purifier.config.guidance == defense.purifier.config.guidance for judge, _ in judged)
