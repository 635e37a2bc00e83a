"""The cascade, as AutoAttack runs its ensemble: within a threat group, attacks run in the
configured order, and each attacks only the samples that no earlier attack of the group (nor
``clean``) has broken in every scoring draw (or by its own verdict). A skipped sample is
recorded as broken by that earlier attack (its scoring draws, with ``skipped_by`` naming it).

Such a sample scores 0 under all three scorings, so no later attack could do better on it: the
worst case over the group is unchanged by the cascade, whatever the headline scoring. (A sample
wrong in only some draws is attacked again: skipping it would stop later attacks from lowering
its expected or majority score.) Each attack's own row then counts the samples an earlier
attack broke as broken too, so it reads "this attack, after the earlier ones"; it is not a
running minimum (a later attack may do less damage than an earlier one on the samples it
attacks), which is what the worst-case row is.
"""
from __future__ import annotations

from typing import Mapping

from ..attacks.suite import AttackConfig
from .config import ExperimentConfig
from .protocol import outcome, threat_group
from .records import Key


def cascade_sources(config: ExperimentConfig, attack: AttackConfig) -> list[AttackConfig]:
    """The attacks whose breaks ``attack`` skips: those listed before it that are ``clean`` or
    of its threat group (none when the cascade is off, or for ``clean`` itself)."""
    if not config.evaluation.cascade or attack.kind == "clean":
        return []
    position = [a.name for a in config.attacks].index(attack.name)
    return [a for a in config.attacks[:position] if a.kind == "clean" or threat_group(a) == threat_group(attack)]


def breaking_record(config: ExperimentConfig, defense: str, attack: AttackConfig, index: int,
                    records: Mapping[Key, dict]) -> dict | None:
    """The record of the first earlier attack that broke sample ``index`` of ``defense`` in
    every draw, or None if ``attack`` must attack it."""
    for source in cascade_sources(config, attack):
        record = records.get((index, defense, source.name))
        if record is not None and outcome(record).expected == 0.0:
            return record
    return None


def skipped_record(breaking: dict, attack: str) -> dict:
    """The record of a sample ``attack`` skipped: the breaking attack's draws and verdict, with
    ``skipped_by`` naming the attack that broke it first."""
    return {**breaking, "attack": attack, "skipped_by": breaking.get("skipped_by", breaking["attack"])}


def passes_per_sample(attack: AttackConfig, draws: int) -> int:
    """About the purifier passes one sample costs ``attack``: its gradient passes (steps x EOT x
    restarts; none for clean and transfer, which never differentiate the defence) and the R
    scoring draws (a start or final evaluation of an iterate, and the same draws' paired scoring
    of an attack's late and start examples, are not counted)."""
    crafting = 0 if attack.kind in ("clean", "transfer") else attack.iterations * attack.eot_draws * attack.restarts
    return crafting + draws


def cascade_savings(records: list[dict], config: ExperimentConfig) -> dict:
    """What the cascade skipped: (sample, defence, attack) records and the fraction of purifier
    passes (``passes_per_sample``) it saved, over every attack but ``clean``."""
    costs = {a.name: passes_per_sample(a, config.evaluation.draws) for a in config.attacks if a.kind != "clean"}
    total = saved = skipped = 0
    for record in records:
        cost = costs.get(record["attack"])
        if cost is None:
            continue
        total += cost
        if "skipped_by" in record:
            saved, skipped = saved + cost, skipped + 1
    return {"enabled": config.evaluation.cascade, "skipped": skipped,
            "records": sum(record["attack"] in costs for record in records),
            "saved_fraction": saved / total if total else 0.0}
