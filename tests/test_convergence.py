"""Convergence diagnostics: PGD's per-iteration trace, its pooling over batches, the flag."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_images, make_tiny_victim
from distpure.attacks.pgd import PGDConfig, pgd
from distpure.evaluation.convergence import TOLERANCE, convergence_summary, curves


def test_pgd_trace_records_every_iterate_and_the_final_one():
    victim, images = make_tiny_victim(), make_tiny_images(6)
    labels = victim(images).argmax(1)
    trace: list[dict] = []
    pgd(victim, images, labels, PGDConfig(steps=4, random_start=False, eps=16 / 255), trace=trace)
    assert [point["step"] for point in trace] == [0, 1, 2, 3, 4]
    assert trace[0]["accuracy"] == 1.0  # the first iterate is the clean images, labelled by the victim
    assert trace[-1]["loss"] > trace[0]["loss"]  # gradient ascent on the loss
    assert all(0.0 <= point["accuracy"] <= 1.0 for point in trace)


def _trace(owner: str, batch: int, n: int, accuracy: list[float]) -> dict:
    return {"owner": owner, "attack": "pgd", "batch": batch, "n": n,
            "trace": [{"step": i, "loss": 0.0, "accuracy": a} for i, a in enumerate(accuracy)]}


def test_curves_pool_batches_by_samples_and_flag_late_falls():
    traces = [_trace("a", 0, 30, [1.0, 0.8, 0.6, 0.6, 0.6]), _trace("a", 1, 10, [1.0, 0.8, 0.6, 0.6, 0.2]),
              _trace("b", 0, 8, [1.0, 0.9, 0.8, 0.7, 0.6])]
    by_owner = {c.owner: c for c in curves(traces)}
    assert by_owner["a"].accuracy == pytest.approx([1.0, 0.8, 0.6, 0.6, 0.5])  # (30 * 0.6 + 10 * 0.2) / 40
    assert by_owner["a"].samples == 40 and by_owner["a"].late_drop == pytest.approx(0.1)
    assert not by_owner["a"].converged and not by_owner["b"].converged
    flat = curves([_trace("c", 0, 5, [1.0, 0.5, 0.5, 0.5, 0.5 - TOLERANCE / 2])])[0]
    assert flat.converged
    # the fall is the fitted line over the last quarter: one noisy last iterate does not decide
    dip = curves([_trace("d", 0, 5, [1.0] * 12 + [0.5, 0.5, 0.5, 0.5, 0.488])])[0]
    assert dip.accuracy[12] - dip.accuracy[-1] > TOLERANCE and dip.late_drop == pytest.approx(0.0096)
    assert dip.converged
    assert flat.late_drop_error == pytest.approx(0.0) and dip.late_drop_error > 0
    # by hand: last quarter 0.50 0.52 0.48 0.52 0.48 over 4 steps, slope -0.004, residual sum of
    # squares 0.00144 (3 degrees of freedom), Sxx 10: error 4 * sqrt(0.00048 / 10)
    noisy = curves([_trace("e", 0, 5, [1.0] * 12 + [0.5, 0.52, 0.48, 0.52, 0.48])])[0]
    assert noisy.late_drop == pytest.approx(0.016) and noisy.late_drop_error == pytest.approx(0.0277128, rel=1e-5)
    assert not noisy.converged  # the flag is the fall alone; the error says how much to trust it
    summary = convergence_summary(traces)
    assert summary["a/pgd"]["converged"] is False and summary["a/pgd"]["final_accuracy"] == pytest.approx(0.5)


def test_batched_eot_equals_sequential_draws_on_a_deterministic_model():
    """EOT draws as one repeated batch: the same loss, gradient and iterate where draws agree."""
    victim, images = make_tiny_victim(), make_tiny_images(3)
    labels = torch.tensor([0, 1, 2])
    runs = {}
    for batch in (1, 3, 4):
        trace: list[dict] = []
        runs[batch] = (pgd(victim, images, labels, PGDConfig(steps=3, eot=4, eot_batch=batch), trace=trace), trace)
    for batch in (3, 4):
        assert torch.allclose(runs[batch][0], runs[1][0], atol=1e-6)
        assert [p["loss"] for p in runs[batch][1]] == pytest.approx([p["loss"] for p in runs[1][1]], rel=1e-5)
    with pytest.raises(ValueError, match="eot_batch"):
        PGDConfig(eot_batch=0)


def test_keep_best_by_held_out_draws_keeps_fooling_iterates():
    """Judged by held-out draws, a sample whose loss-selected example fools the judge keeps a
    fooling example, and the overall accuracy under the judge is no higher."""
    victim, images = make_tiny_victim(), make_tiny_images(8, seed=5)
    with torch.no_grad():
        labels = victim(images).argmax(1)
    by_loss = pgd(victim, images, labels, PGDConfig(steps=6, eps=12 / 255))
    judged = pgd(victim, images, labels, PGDConfig(steps=6, eps=12 / 255, holdout_draws=1), judge=victim)
    with torch.no_grad():
        fooled_by_loss = victim(by_loss).argmax(1) != labels
        fooled_judged = victim(judged).argmax(1) != labels
    assert (fooled_judged | ~fooled_by_loss).all()
    assert fooled_judged.sum() >= fooled_by_loss.sum()
    assert torch.equal(pgd(victim, images, labels, PGDConfig(steps=6, eps=12 / 255, holdout_draws=1)), by_loss)


class _FooledOnlyAt(torch.nn.Module):
    """A judge that misclassifies exactly one point per sample (``where``) and nothing else."""

    def __init__(self, where: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__()
        self.where, self.labels = where, labels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        there = (x - self.where).flatten(1).abs().amax(1) < 1e-7
        predicted = torch.where(there, (self.labels + 1) % 10, self.labels)
        return torch.nn.functional.one_hot(predicted, 10).float()


def test_held_out_judge_overrules_the_attackers_loss():
    """The attacker's loss prefers the last iterate; the judge is fooled only by the first: the
    judged selection must return the first (the start), the loss-based one does not."""
    victim, images = make_tiny_victim(), make_tiny_images(4, seed=6)
    with torch.no_grad():
        labels = victim(images).argmax(1)
    start = pgd(victim, images, labels, PGDConfig(steps=2, eps=8 / 255))
    config = PGDConfig(steps=3, eps=8 / 255, holdout_draws=2)
    judged = pgd(victim, images, labels, config, start=start, judge=_FooledOnlyAt(start, labels))
    assert torch.equal(judged, start)
    assert not torch.equal(pgd(victim, images, labels, config, start=start), start)
