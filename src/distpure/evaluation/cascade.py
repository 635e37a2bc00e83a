"""The cascade, as AutoAttack runs its ensemble: within a threat group, attacks run in the
configured order, and each attacks only the samples that no earlier attack of the group (nor
``clean``) has broken in every one of the attacker's selection draws (or by its own verdict):
the attacker stops on what it can see, never on the scoring draws. A skipped sample is recorded
as broken by that earlier attack (a copy of its record, with ``skipped_by`` naming it).

The attacker picks the earliest candidate of lowest selection accuracy, and a breaking record
has none, so the pick, and with it the worst case over the group, is the same as without the
cascade. (A sample wrong in only some draws is attacked again: skipping it would stop later
attacks from lowering its expected or majority score.) Runs recorded before selection draws
chose on all R scoring draws; their records read as the first half selecting, and 0 of R
implies 0 of the first half, so their skips still hold. Each attack's own row then counts the samples an earlier
attack broke as broken too, so it reads "this attack, after the earlier ones"; it is not a
running minimum (a later attack may do less damage than an earlier one on the samples it
attacks), which is what the worst-case row is.
"""
from __future__ import annotations

from typing import Mapping

from ..attacks.suite import AttackConfig
from .config import ExperimentConfig
from .protocol import attacker_estimate, threat_group
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
    every selection draw, or None if ``attack`` must attack it."""
    for source in cascade_sources(config, attack):
        record = records.get((index, defense, source.name))
        if record is not None and breaks(record):
            return record
    return None


def breaks(record: dict) -> bool:
    """Whether a record's example is wrong in every draw the attacker saw (or by its verdict)."""
    return attacker_estimate(record) == 0.0


def check_skips(records: list[dict], config: ExperimentConfig) -> None:
    """Refuse records whose cascade skips no longer hold: each skipped record's breaking record
    (``skipped_by``) must exist, be a source of its attack, break the sample and hold the draws
    the skip copied (a breaking record rerun or edited since would leave the skip stale)."""
    by_key = {(int(r["index"]), r["defense"], r["attack"]): r for r in records}
    attacks = {a.name: a for a in config.attacks}
    for record in records:
        if "skipped_by" not in record:
            continue
        where = f"record {record['index']} ({record['defense']} / {record['attack']})"
        source = by_key.get((int(record["index"]), record["defense"], record["skipped_by"]))
        if source is None:
            raise ValueError(f"{where} was skipped as broken by {record['skipped_by']!r}, whose record is missing")
        attack = attacks.get(record["attack"])
        if attack is not None and record["skipped_by"] not in [a.name for a in cascade_sources(config, attack)]:
            raise ValueError(f"{where} was skipped as broken by {record['skipped_by']!r}, "
                             "which is not an earlier attack of its threat group")
        if not breaks(source) or any(record.get(f) != source.get(f) for f in COPIED_FIELDS):
            raise ValueError(f"{where} was skipped as broken by {record['skipped_by']!r}, whose record "
                             "no longer breaks it the same way (rerun or edited since): rerun the skipped attack")


#: what a skipped record copies of its breaking record, and must still match
COPIED_FIELDS = ("label", "predictions", "selection_predictions", "verdict")


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
