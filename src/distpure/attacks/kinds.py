"""The attack kinds of an experiment, one class each: ``clean``, ``transfer`` (PGD on the
undefended victim), ``pgd`` (exact gradients through the whole defence, checkpointed per reverse
step, with EOT), ``bpda`` (the purifier's backward pass is the identity), ``surrogate`` (exact
gradients through a changed copy of the purifier: fewer steps, another guidance target) and
``apgd`` (AutoAttack's APGD on the same exact EOT gradient) and ``autoattack`` (standard or
rand). Adding a kind is a class here, registered by name."""
from __future__ import annotations

import torch
from torch import nn

from ..defenses.defended import DefendedClassifier, own_stream
from ..seeding import derive_seed
from .autoattack import NORMS as AUTOATTACK_NORMS
from .autoattack import run_autoattack
from .base import ATTACKS, Attack, Crafted
from .bpda import BPDA
from .deviation import DeviatedReconstruction
from .pgd import ProgressStore, attack_loss, pgd, project


@ATTACKS.register("clean")
class Clean(Attack):
    """No attack: the clean images."""

    def perturb(self, defense, images, labels, seed, start=None, sample_keys=None, frozen_seed=None,
                progress=None) -> Crafted:
        return Crafted(images)


@ATTACKS.register("transfer")
class Transfer(Attack):
    """PGD on the undefended victim; the defence is met only when the examples are scored."""

    resumable = True

    def perturb(self, defense, images, labels, seed, start=None, sample_keys=None, frozen_seed=None,
                progress=None) -> Crafted:
        config, trace = self.config.pgd_config(derive_seed(seed, "pgd-start")), []
        return Crafted(pgd(defense.victim, images, labels, config, start, trace, progress=progress), trace=trace)


class DefenceAttack(Attack):
    """An attack on the defence itself: the scored defence (same victim and votes) with the
    purifier as this kind runs it, drawing noise of the attacker's own, or, under the frozen-noise
    threat model, one fixed draw per sample that attacker and scorer share."""

    resumable = True

    def perturb(self, defense, images, labels, seed, start=None, sample_keys=None, frozen_seed=None,
                progress=None) -> Crafted:
        if frozen_seed is None:
            frozen_seed = derive_seed(seed, "frozen-noise")
        frozen = self.frozen_defense(defense, images, sample_keys, frozen_seed) if self.config.frozen_noise else None
        scored = frozen or defense
        return self.attack(scored, self.attacked_model(scored, seed), images, labels, seed, start, frozen, progress)

    def attack(self, defense: DefendedClassifier, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
               seed: int, start: torch.Tensor | None, frozen: DefendedClassifier | None,
               progress: ProgressStore | None = None) -> Crafted:
        """PGD with EOT on ``model``, what the attacker differentiates of ``defense`` (the kinds
        differ in it); with ``holdout_draws`` the iterate kept is judged by held-out draws of
        ``defense`` itself."""
        config, trace, late = self.config.pgd_config(derive_seed(seed, "pgd-start")), [], []
        judge = self.judge(defense, seed) if config.holdout_draws else None
        examples = pgd(model, images, labels, config, start, trace, judge, late, progress)
        return Crafted(examples, frozen_scorer=frozen, trace=trace, late_examples=late[0] if late else None)

    @staticmethod
    def judge(defense: DefendedClassifier, seed: int) -> DefendedClassifier:
        """The defence as it scores (whole, not a surrogate), with held-out noise of the
        attacker's own: it judges which iterate to keep, never the scorer's draws."""
        return defense.with_noise_stream(derive_seed(seed, "holdout"))

    def attacked_model(self, defense: DefendedClassifier, seed: int) -> nn.Module:
        """What the attacker differentiates: the victim alone where nothing is in front of it;
        with ``deviation`` (λ), the defence with DiffAttack's deviated-reconstruction loss."""
        if defense.purifier is None:
            return defense.victim
        attacked = defense.with_purifier(self.attacked_purifier(defense.purifier, seed))
        return DeviatedReconstruction(attacked, self.config.deviation) if self.config.deviation else attacked

    def attacked_purifier(self, purifier: nn.Module, seed: int, **overrides) -> nn.Module:
        """The purifier as the attacker runs it: checkpointed per reverse step (unless the attack
        turns it off, trading memory for speed at few steps: 1.3x at 10 in ``distpure bench``),
        with the attacker's own noise stream (a frozen-noise purifier keeps its fixed draw)."""
        if not hasattr(own_stream(purifier), "variant"):  # deterministic: nothing to draw
            return purifier
        if not purifier.stochastic:
            return purifier.variant(checkpoint_steps=self.config.checkpoint, **overrides)
        return purifier.variant(checkpoint_steps=self.config.checkpoint,
                                seed=derive_seed(seed, "attack-noise"), **overrides)

    @staticmethod
    def frozen_defense(defense: DefendedClassifier, images: torch.Tensor, sample_keys: list[int] | None,
                       seed: int) -> DefendedClassifier | None:
        """The defence with one fixed noise draw per sample (from ``seed``, keyed by
        ``sample_keys``, else by position), shared by the attacker and the scorer; None where
        nothing is random. A random defence that cannot fix its noise is refused, not attacked
        with fresh noise under a frozen label."""
        purifier = defense.purifier
        if not defense.stochastic:
            return None
        if not hasattr(purifier, "bind_samples"):
            raise ValueError(f"frozen_noise needs a diffusion purifier; {type(purifier).__name__} "
                             "cannot fix its randomness")
        keys = sample_keys if sample_keys is not None else list(range(len(images)))
        frozen = purifier.variant(frozen_noise=True, seed=seed)
        return defense.with_purifier(frozen.bind_samples(images, keys))


@ATTACKS.register("pgd")
class ExactPGD(DefenceAttack):
    """PGD-EOT with exact gradients through every reverse step and the guidance term."""


@ATTACKS.register("bpda")
class BPDAPGD(DefenceAttack):
    """PGD-EOT whose gradient treats the purifier as the identity (Athalye et al. 2018)."""

    def attacked_purifier(self, purifier, seed, **overrides):
        return BPDA(super().attacked_purifier(purifier, seed, **overrides))


@ATTACKS.register("surrogate")
class SurrogatePGD(DefenceAttack):
    """PGD-EOT with exact gradients through a changed copy of the purifier (``surrogate``
    settings: fewer steps, no guidance, a straight-through guidance target); the defence that scores
    the examples is unchanged."""

    def attacked_purifier(self, purifier, seed, **overrides):
        return super().attacked_purifier(purifier, seed, **{**self.config.surrogate, **overrides})


@ATTACKS.register("autoattack")
class AutoAttackEnsemble(DefenceAttack):
    """AutoAttack's ``standard`` or ``rand`` ensemble and its warnings. Its own verdict is kept
    only on a deterministic defence: on a randomized one it comes from one noisy forward pass of
    its own, so there its examples are scored by the R draws like any attack's."""

    resumable = False

    def attack(self, defense, model, images, labels, seed, start, frozen, progress=None) -> Crafted:
        config = self.config
        result = run_autoattack(model, images, labels, norm=config.norm, eps=config.eps,
                                version=config.version, iterations=config.iterations,
                                restarts=config.restarts, eot_iter=config.eot_draws,
                                seed=derive_seed(seed, "pgd-start"), attacks_to_run=config.attacks_to_run)
        verdict = None if defense.stochastic else result.broken
        return Crafted(result.examples, verdict, frozen, result.warnings)


@ATTACKS.register("apgd")
class APGD(DefenceAttack):
    """pyautoattack's APGD (its step-size schedule and momentum; CE or DLR loss) on the exact EOT
    gradient of the defence. Every sample keeps its iterate of highest loss averaged over that
    iterate's EOT draws, over all restarts (APGD's own keep-best judges by its last draw alone);
    the first restart starts at ``start`` (a warm start, projected into the ε-ball) when given.
    The fresh scoring draws, not the attacker's, then judge the kept iterate."""

    resumable = False

    def attack(self, defense, model, images, labels, seed, start, frozen, progress=None) -> Crafted:
        from pyautoattack.autopgd_base import APGDAttack

        config = self.config
        tracked = _EOTMeanTracker(model, images, labels, config.loss, config.eot_draws)
        apgd = APGDAttack(tracked, n_iter=config.iterations, norm=AUTOATTACK_NORMS[config.norm], eps=config.eps,
                          loss=config.loss, eot_iter=config.eot_draws, device=images.device)
        apgd.init_hyperparam(images)
        if start is not None:
            start = images + project(start.to(images) - images, images, config.norm, config.eps)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "pgd-start"))
            for restart in range(config.restarts):
                apgd.attack_single_run(images, labels, start if restart == 0 else None)
        return Crafted(tracked.best.detach(), frozen_scorer=frozen, trace=tracked.trace(config.restarts))


class _EOTMeanTracker(nn.Module):
    """``model`` as APGD calls it, ``eot`` calls per iterate (the start included), restart after
    restart. It keeps each sample's iterate of highest loss averaged over its ``eot`` calls, and
    notes each call's mean loss and accuracy for a convergence trace like PGD's."""

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, loss: str, eot: int) -> None:
        super().__init__()
        self.model, self.labels, self.loss, self.eot = model, labels, loss, eot
        self.best = images.detach().clone()
        self.best_loss = torch.full((len(images),), float("-inf"), device=images.device)
        self._loss_sum = torch.zeros(len(images), device=images.device)
        self._calls_this_iterate = 0
        self.calls: list[tuple[float, float]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(images)
        with torch.no_grad():
            losses = attack_loss(logits, self.labels, self.loss)
            self.calls.append((float(losses.mean()), float((logits.argmax(1) == self.labels).float().mean())))
            self._loss_sum += losses
            self._calls_this_iterate += 1
            if self._calls_this_iterate == self.eot:
                mean = self._loss_sum / self.eot
                better = mean > self.best_loss
                self.best[better], self.best_loss[better] = images.detach()[better], mean[better]
                self._loss_sum.zero_()
                self._calls_this_iterate = 0
        return logits

    def trace(self, restarts: int) -> list[dict]:
        """Per iterate, loss and accuracy averaged over its EOT calls and over the restarts."""
        per_restart = len(self.calls) // restarts
        points = []
        for step in range(per_restart // self.eot):
            calls = [self.calls[r * per_restart + step * self.eot + k] for r in range(restarts) for k in range(self.eot)]
            points.append({"step": step, "loss": sum(c[0] for c in calls) / len(calls),
                           "accuracy": sum(c[1] for c in calls) / len(calls)})
        return points
