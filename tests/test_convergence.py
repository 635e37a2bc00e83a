"""Convergence diagnostics: PGD's per-iteration trace and late iterate, the trace's pooling over
batches, the scored fall over the last quarter, continuations, and the flag each decides."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_images, make_tiny_victim
from distpure.attacks.pgd import PGDConfig, late_iteration, pgd
from distpure.attacks.suite import AttackConfig
from distpure.evaluation.config import DefenseConfig, ExperimentConfig
from distpure.evaluation.convergence import (TOLERANCE, Continuation, Convergence, Curve, continuation_gains, continues, convergence,
                                             convergence_summary, curves, scored_late_falls)
from distpure.evaluation.stats import Difference


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
    summary = convergence_summary(traces, [], ExperimentConfig(defenses=[DefenseConfig("a", kind="none")],
                                                               attacks=[AttackConfig("pgd")]))
    assert summary["a/pgd"]["converged"] is False and summary["a/pgd"]["final_accuracy"] == pytest.approx(0.5)
    assert summary["a/pgd"]["basis"] == "trace" and summary["a/pgd"]["fall"] == pytest.approx(0.1)


def test_late_iterate_is_what_a_shorter_attack_returns():
    """What PGD had kept at the start of its last quarter equals the whole result of the same
    PGD stopped there (a deterministic model, a fixed step size)."""
    victim, images = make_tiny_victim(), make_tiny_images(5, seed=3)
    labels = victim(images).argmax(1)
    config = dict(eps=8 / 255, step_size=1 / 255, momentum=0.5)
    late: list[torch.Tensor] = []
    final = pgd(victim, images, labels, PGDConfig(steps=8, **config), late=late)
    assert late_iteration(8) == 6 and len(late) == 1
    assert torch.equal(late[0], pgd(victim, images, labels, PGDConfig(steps=6, **config)))
    assert not torch.equal(late[0], final)
    late.clear()  # without keep-best, the iterate itself
    pgd(victim, images, labels, PGDConfig(steps=8, keep_best=False, **config), late=late)
    assert torch.equal(late[0], pgd(victim, images, labels, PGDConfig(steps=6, keep_best=False, **config)))


def _record(attack: str, index: int, predictions: list[int], late: list[int] | None = None, **extra) -> dict:
    return {"defense": "d", "attack": attack, "index": index, "label": 0, "predictions": predictions,
            **({"late_predictions": late} if late is not None else {}), **extra}


def test_scored_late_fall_pairs_the_same_draws_and_ignores_skipped_samples():
    records = [_record("pgd", 0, [0, 0, 0, 0], late=[0, 0, 0, 0]),   # no fall
               _record("pgd", 1, [1, 1, 0, 0], late=[0, 0, 0, 0]),   # 1.0 -> 0.5
               _record("pgd", 2, [1, 1, 1, 1], late=[0, 1, 1, 1]),   # 0.25 -> 0
               _record("pgd", 3, [1, 1, 1, 1], late=[0, 0, 0, 0], skipped_by="transfer"),
               _record("transfer", 0, [0, 0, 0, 0])]
    falls = scored_late_falls(records)
    assert set(falls) == {("d", "pgd")}
    assert falls["d", "pgd"].total == 3 and falls["d", "pgd"].mean == pytest.approx(0.25)


def test_continuations_are_same_kind_and_threat_from_the_start():
    short = AttackConfig("pgd", steps=20, eot=2)
    assert continues(AttackConfig("pgd-long", steps=40, start_from="pgd"), short)
    assert not continues(AttackConfig("apgd", kind="apgd", start_from="pgd"), short)
    assert not continues(AttackConfig("pgd-l2", norm="l2", eps="128/255", start_from="pgd"), short)
    assert not continues(AttackConfig("soft", kind="surrogate", surrogate={"target": "soft"}, start_from="pgd"),
                         AttackConfig("pgd", kind="surrogate"))
    assert not continues(AttackConfig("pgd-long", steps=40, start_from="transfer"), short)


def test_continuation_gains_pair_the_same_draws_and_the_scored_measures_decide():
    """A continuation's gain compares its own draws on its start's examples and on its own (not
    the start's records, by which the cascade chose the samples); of two continuations of one
    start the larger gain counts; a scored measure overrules the attacker's own trace."""
    config = ExperimentConfig(defenses=[DefenseConfig("d", kind="none")], attacks=[
        AttackConfig("clean", kind="clean"), AttackConfig("pgd"), AttackConfig("pgd-long", start_from="pgd"),
        AttackConfig("pgd-longer", start_from="pgd"), AttackConfig("apgd", kind="apgd", start_from="pgd")])
    # label 0: a 0 is a right draw
    records = [_record("pgd", 0, [1, 0], late=[0, 0]), _record("pgd", 1, [0, 0], late=[0, 0]),
               _record("pgd", 2, [1, 1], late=[1, 1]),  # late falls 0.5, 0, 0: 1/6
               # the start's own draws said 0.5 and 1.0; the continuation's draws on the same
               # examples say what it gained: nothing on sample 0, 0.5 on sample 1
               {**_record("pgd-long", 0, [0, 0]), "start_predictions": [0, 0]},
               {**_record("pgd-long", 1, [0, 1]), "start_predictions": [0, 0]},
               _record("pgd-long", 2, [1, 1], skipped_by="pgd"),
               {**_record("pgd-longer", 0, [0, 0]), "start_predictions": [0, 0]},
               {**_record("pgd-longer", 1, [0, 0]), "start_predictions": [0, 0]},
               _record("apgd", 0, [1, 1]), _record("apgd", 1, [1, 1])]
    gains = {g.attack: g for g in continuation_gains(records, config)}  # apgd: another kind, no gain
    assert set(gains) == {"pgd-long", "pgd-longer"} and {g.start for g in gains.values()} == {"pgd"}
    assert gains["pgd-long"].gain.total == 2 and gains["pgd-long"].gain.mean == pytest.approx(0.25)
    assert gains["pgd-longer"].gain.mean == 0.0
    falling_trace = {**_trace("d", 0, 3, [1.0, 1.0, 1.0, 1.0, 0.5]), "attack": "pgd-long"}
    found = {item.attack: item for item in convergence([falling_trace], records, config)}
    assert found["pgd"].continuation.attack == "pgd-long"  # the larger of the two gains
    assert found["pgd"].basis == "scored and continuation" and not found["pgd"].converged
    assert found["pgd"].scored_fall.mean == pytest.approx(1 / 6)
    assert found["pgd"].fall == pytest.approx(0.25)  # the larger of the scored falls
    assert found["pgd-long"].basis == "trace" and not found["pgd-long"].converged
    assert "apgd" not in found  # no trace, no late examples, no continuation
    summary = convergence_summary([falling_trace], records, config)
    assert summary["d/pgd"]["continued_by"] == "pgd-long" and summary["d/pgd"]["scored_samples"] == 3
    assert summary["d/pgd-long"]["late_drop"] > TOLERANCE and "scored_late_drop" not in summary["d/pgd-long"]


@pytest.mark.parametrize("fall, status", [
    (Difference(0.009, -0.003, 0.021, 84), "not converged"),  # the paper's L2 chain: mean below, interval above
    (Difference(0.005, -0.005, 0.015, 40), "converged"),
    (Difference(0.012, 0.002, 0.019, 60), "not converged"),  # mean above one point
    (Difference(0.0, -0.01, 0.01, 12), "not judged"),  # too few samples to judge
])
def test_convergence_is_judged_by_mean_interval_and_samples(fall, status):
    assert Convergence("d", "a", None, fall, None).status == status


def test_a_continuation_that_still_gains_flags_its_start():
    """A start whose own last quarter looks flat is not converged when its continuation gained."""
    flat = Difference(0.0, -0.01, 0.01, 84)
    gained = Continuation("d", "a", "a-long", Difference(0.034, 0.014, 0.054, 84))
    assert Convergence("d", "a", None, flat, gained).status == "not converged"


def _curve(accuracy: list[float], samples: int) -> Curve:
    steps = list(range(len(accuracy)))
    return Curve("d", "a", steps, accuracy, [0.0] * len(accuracy), samples)


@pytest.mark.parametrize("accuracy, samples, status", [
    ([0.5] * 8 + [0.40, 0.40, 0.40, 0.40], 40, "converged"),  # flat last quarter, no scatter
    ([0.5] * 8 + [0.40, 0.39, 0.38, 0.37], 40, "not converged"),  # still falling 3 points
    ([0.5] * 8 + [0.44, 0.36, 0.36, 0.44], 40, "not converged"),  # flat on average, too noisy to tell
    ([0.5] * 8 + [0.40, 0.40, 0.40, 0.40], 12, "not judged"),  # too few samples traced
])
def test_a_trace_alone_is_judged_by_its_fall_its_error_and_samples(accuracy, samples, status):
    """An attack with no scored examples (only its own-draw trace) is judged like a scored one:
    the fall, its upper end, and a minimum of samples."""
    assert Convergence("d", "a", _curve(accuracy, samples), None, None).status == status
