"""Attacks on any model from [0, 1] images to logits: PGD (+EOT), BPDA, transfer, AutoAttack."""
