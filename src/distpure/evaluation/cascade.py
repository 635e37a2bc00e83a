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
implies 0 of the first half, so their skips still hold, until ``rescore`` gives the breaking
records selection draws of their own: a skip whose breaking record then no longer breaks the
sample is stale (``skip_problem``), which the summary refuses and ``evaluate --new-resumption``
reruns. Each attack's own row counts the samples an earlier attack broke as broken too, so it
reads "this attack, after the earlier ones"; it is not a running minimum (a later attack may do
less damage than an earlier one on the samples it attacks), which is what the worst-case row is.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Mapping

from ..attacks.suite import AttackConfig
from .config import ExperimentConfig
from .protocol import attacker_estimate, threat_group
from .records import Key, record_key

_LOG = logging.getLogger("distpure")


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


def skip_problem(record: dict, records: Mapping[Key, dict], config: ExperimentConfig) -> str | None:
    """Why a skipped record's skip no longer holds, or None where it holds (or the record is no
    skip): its breaking record (``skipped_by``) must exist, be a source of its attack, break the
    sample and hold the draws the skip copied (one rerun, rescored or edited since would not)."""
    if "skipped_by" not in record:
        return None
    breaker = record["skipped_by"]
    source = records.get((int(record["index"]), record["defense"], breaker))
    if source is None:
        return f"was skipped as broken by {breaker!r}, whose record is missing"
    attack = next((a for a in config.attacks if a.name == record["attack"]), None)
    if attack is not None and breaker not in [a.name for a in cascade_sources(config, attack)]:
        return f"was skipped as broken by {breaker!r}, which is not an earlier attack of its threat group"
    if not breaks(source) or any(record.get(f) != source.get(f) for f in COPIED_FIELDS):
        return (f"was skipped as broken by {breaker!r}, whose record no longer breaks it the same way "
                "(rerun, rescored or edited since)")
    return None


def stale_skips(keys: Iterable[Key], records: Mapping[Key, dict], config: ExperimentConfig) -> list[Key]:
    """The keys among ``keys`` whose record is a skip that no longer holds (see ``skip_problem``)."""
    return [key for key in keys if key in records and skip_problem(records[key], records, config) is not None]


def stale_skips_text(stale: list[Key], records: Mapping[Key, dict], config: ExperimentConfig) -> str:
    """``2 cascade skip(s) no longer hold, e.g. record 3 (d / pgd) was skipped as ...``, for a message."""
    index, defense, attack = stale[0]
    return (f"{len(stale)} cascade skip(s) no longer hold (after distpure rescore, a rerun or an edit), e.g. "
            f"record {index} ({defense} / {attack}) {skip_problem(records[stale[0]], records, config)}")


def drop_stale_skips(where: Path, config: ExperimentConfig, records: dict[Key, dict], keys: Iterable[Key],
                     refuse: bool) -> None:
    """Forget the skips among ``keys`` that no longer hold, so that their units run again; with
    ``refuse`` (a resume without ``--new-resumption``) refuse them instead, named."""
    stale = stale_skips(keys, records, config)
    if stale and refuse:
        raise ValueError(f"{where}: {stale_skips_text(stale, records, config)}: pass --new-resumption "
                         "to drop them and rerun those attacks")
    if stale:
        _LOG.info("rerunning the attacks of %s", stale_skips_text(stale, records, config))
    for key in stale:
        del records[key]


def check_skips(records: list[dict], config: ExperimentConfig) -> None:
    """Refuse records whose cascade skips no longer hold (see ``skip_problem``)."""
    by_key = {record_key(r): r for r in records}
    stale = stale_skips(by_key, by_key, config)
    if stale:
        raise ValueError(f"{stale_skips_text(stale, by_key, config)}: rerun the skipped attacks (distpure "
                         "evaluate CONFIG --out RUN_DIR --new-resumption drops the stale skips and reruns them)")


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
