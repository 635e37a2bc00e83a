"""The demo experiment: no defence vs DiffPure vs victim-guided purification on CIFAR-10."""
from __future__ import annotations

from ..attacks.suite import AttackConfig
from .config import DataConfig, DefenseConfig, EvaluationConfig, ExperimentConfig


# Printed above the demo's table: its worst case is over clean and one transfer attack, which a
# newcomer would otherwise read as the defence's robustness.
DEMO_HEADING = ("NOT a robustness figure: a transfer-attack check (PGD crafted on the undefended victim); "
                "its worst case is the worst of clean and transfer. The converged adaptive evaluation is "
                "configs/cifar10-honest.yaml (docs/findings.md).")


def demo_experiment(limit: int = 256) -> ExperimentConfig:
    """Clean and transfer PGD-L∞ 8/255 (20 steps, on the victim alone) accuracy of three defences,
    each example scored by one purification (expected accuracy; the three scorings of several
    draws are what ``distpure evaluate`` on the configs reports)."""
    return ExperimentConfig(
        name="demo",
        description="CIFAR-10 (JPEG copy) test images; transfer PGD-Linf 8/255, 20 steps, crafted "
                    "on the undefended victim, then evaluated through each defence; one scoring "
                    "draw per example (an estimate of expected accuracy).",
        data=DataConfig(limit=limit),
        defenses=[DefenseConfig("no-defense", kind="none"),
                  DefenseConfig("diffpure", purifier={"guidance": "none"}),
                  DefenseConfig("victim-guided", purifier={"guidance": "victim"})],
        attacks=[AttackConfig("clean", kind="clean"),
                 AttackConfig("transfer-pgd-linf", kind="transfer", eps="8/255", steps=20)],
        evaluation=EvaluationConfig(draws=1),
        batch_size=64,
    )
