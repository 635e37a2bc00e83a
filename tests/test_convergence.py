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
