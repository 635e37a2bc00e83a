"""Attacks on any model from [0, 1] images to logits: PGD (+EOT), BPDA, transfer, AutoAttack."""
from . import kinds  # noqa: F401  (registers the attack kinds that AttackConfig accepts)
