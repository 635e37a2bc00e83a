"""Rescoring a run recorded before selection draws (distpure 0.2 and earlier): every record gets
the selection draws a new run of this version writes (the attacker's queries, a noise stream of
their own: ``protocol.selection_stream``), made from the examples the run kept, so that its worst
case picks on draws that do not score it. Forward passes only: no attack on the defence reruns.

Unit by unit ((batch, defence, attack), in the order ``evaluate`` runs them):

- where the attacker and the scorer share one draw (a deterministic defence, frozen noise), the
  selection draw is the scoring draw, copied (a new run computes the same);
- otherwise the unit's examples, got as ``evaluate`` gets them (the clean images; transfer
  examples recrafted on the victim alone, as a resume recrafts them; an adaptive attack's kept
  ``crafted/`` examples), are classified by the selection draws, seeded as a new run seeds them
  and on the same samples at once: a rescored record is the record a new run would have written;
- a unit whose adaptive examples were not kept (runs older than ``crafted/``) is left alone:
  its records keep the old split (the first half of the scoring draws selects);
- a cascade skip copies its breaking record's new draws where that record still breaks the
  sample; where it no longer does, the skip is stale and left alone (``cascade.skip_problem``):
  the summary refuses it until ``evaluate --new-resumption`` reruns its attack.

The records file is rewritten whole (atomically) after each unit, so a stopped rescore continues
where it stopped. Selection draws at another resolved precision than the records' are refused
unless ``any_precision``, which names it in those records (``selection_precision``) and in the
session's line of ``sessions.jsonl``. There is no lock: never rescore a directory that
``evaluate`` is writing to (one of the two would lose the other's records).
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..attacks.suite import AttackConfig, Crafted
from ..config import dump_yaml
from ..data import LabelledImages
from ..defenses.defended import DefendedClassifier
from ..devices import describe_hardware, hardware, resolve_device
from .cascade import skip_problem, stale_skips_text
from .config import DefenseConfig, ExperimentConfig
from .protocol import SELECTION_FIELD, predict_draws, scorers, selection_stream
from .records import Key, check_dataset_indices, record_key, write_sorted
from .resolved import (legacy_stamp, package_version, record_stamp, resolved_changes, resolved_settings,
                       stored_experiment)
from .rundir import RESCORE, RunDirectory, evaluation_sessions
from .runner import (KINDS_NOT_KEPT, Batch, adversarial_examples, build_defenses, crafted_key, kept_examples,
                     kept_rows, load_experiment_data, unit_seed, write_summary)
from .timing import duration, time_summary

#: where a record's selection draws were made at another precision than its scoring draws
PRECISION_FIELD = "selection_precision"
#: what a rescore did (or, dry, will do) with each record it looked at, in the order it says so
OUTCOMES = {"done": "with their selection draws already",
            "scored": "classified by selection draws from their examples",
            "copied": "given their one draw (a deterministic defence or frozen noise: the scoring draw)",
            "skips": "cascade skips given their breaking record's draws",
            "stale": "stale cascade skips (their breaking record no longer breaks the sample), left alone",
            "unkept": "left with the old split (no kept examples)"}
DRY_SKIPS = "cascade skips, to copy their breaking record's draws where it still breaks the sample (else stale)"


@dataclass
class Unit:
    """One (batch, defence, attack) of a run; its records are read from the batch's record map."""

    batch: Batch
    spec: DefenseConfig
    attack: AttackConfig
    defense: DefendedClassifier

    @property
    def keys(self) -> list[Key]:
        return [(i, self.spec.name, self.attack.name) for i in self.batch.indices]

    @property
    def records(self) -> list[dict]:
        return [self.batch.written[key] for key in self.keys]

    @property
    def attacked(self) -> list[int]:
        """The batch positions its attack attacked (not skipped): scored together, as in the run."""
        return [p for p, record in enumerate(self.records) if "skipped_by" not in record]

    @property
    def shared_draw(self) -> bool:
        """Whether attacker and scorer share one draw (a deterministic defence, frozen noise)."""
        return not self.defense.stochastic or self.attack.frozen_noise

    def lacking(self, draws: int) -> list[int]:
        """The batch positions whose record holds fewer selection draws than a new run writes."""
        wanted = 1 if self.shared_draw else draws
        return [p for p, record in enumerate(self.records) if len(record.get(SELECTION_FIELD, ())) < wanted]

    def way(self, draws: int) -> str | None:
        """How its attacked records get their draws: ``copied``, ``scored`` (from its examples) or
        ``unkept`` (none kept); None where none lacks them."""
        if not set(self.lacking(draws)) & set(self.attacked):
            return None
        if self.shared_draw:
            return "copied"
        kept = self.attack.kind in KINDS_NOT_KEPT or set(self.attacked) <= set(
            kept_rows(self.batch.files, self.spec.name, self.attack.name, self.batch.number))
        return "scored" if kept else "unkept"


@dataclass
class Tally:
    """Which records a rescore gave draws to, how, and what that cost (or, dry, will)."""

    draws: int
    records: int
    outcomes: dict[str, list[Key]] = field(default_factory=lambda: {name: [] for name in OUTCOMES})
    purifications: Counter[str] = field(default_factory=Counter)  # by defence
    transfer_batches: set[tuple] = field(default_factory=set)


def rescore(run_dir: str | Path, draws: int | None = None, dry_run: bool = False, any_precision: bool = False,
            show_progress: bool = True) -> str:
    """Give the records of ``run_dir`` ``draws`` selection draws (default: the run's
    ``evaluation.selection_draws``) as the module says, and return what was done; ``dry_run``
    runs no model and writes nothing, and says what a rescore would do and cost."""
    files = RunDirectory(run_dir)
    if files.shard_result_files():
        raise ValueError(f"{files.root} holds per-process results files: an evaluate is running there or stopped "
                         "mid-way; finish it (evaluate merges them) before rescoring")
    config = stored_experiment(files)
    draws = _checked_draws(config, draws)
    device = resolve_device(config.device)
    data = load_experiment_data(config)
    records = {record_key(r): r for r in files.records()}
    check_dataset_indices(records.values(), data.indices.tolist())
    defenses = build_defenses(config, device)
    changed = resolved_changes(files, resolved_settings(config, defenses)["settings"])
    if changed:
        raise ValueError(f"{files.root} was run with other settings than this version resolves "
                         f"({'; '.join(changed[:8])}): its selection draws would be another defence's")
    units = _units(config, files, data, records, defenses, device)
    machine = hardware(device, config.precision)
    others = _other_precisions(units, draws, legacy_stamp(files), machine["resolved_precision"])
    if dry_run:
        return "\n".join([_format(_plan(units, draws, len(records)), files, config, dry=True),
                          *_precision_lines(others, machine), "dry run: nothing written"])
    if others and not any_precision:
        raise ValueError(f"{files.root}: " + _precision_lines(others, machine)[0])
    _append_session(files, machine, draws, bool(others))
    if draws != config.evaluation.selection_draws:
        _store_selection_draws(files, config, draws)
    tally, started, legacy = Tally(draws, len(records)), time.monotonic(), legacy_stamp(files)
    crafted: dict[int, dict[tuple[str, str], Crafted]] = {}
    for unit in tqdm(units, disable=not show_progress, desc=f"rescore {config.name}", dynamic_ncols=True):
        if _rescore_unit(unit, draws, crafted.setdefault(unit.batch.number, {}), machine["resolved_precision"],
                         legacy, tally):
            write_sorted(list(records.values()), files.results)
    _refresh_summary(files, config, list(records.values()), tally)
    return "\n".join([_format(tally, files, config, dry=False), f"time: {duration(time.monotonic() - started)}",
                      _next_step(files, config, records, tally)])


def _checked_draws(config: ExperimentConfig, draws: int | None) -> int:
    """The selection draws to give: ``draws``, else the run's own; never fewer than the run's
    (its records may hold that many already: a rescore only adds draws)."""
    own = config.evaluation.selection_draws
    if draws is not None and (isinstance(draws, bool) or draws < own):
        raise ValueError(f"--selection-draws must be at least the run's evaluation.selection_draws ({own}), "
                         f"got {draws}")
    return own if draws is None else draws


def _units(config: ExperimentConfig, files: RunDirectory, data: LabelledImages, records: dict[Key, dict],
           defenses: dict[str, DefendedClassifier], device: torch.device) -> list[Unit]:
    """Every unit of the run with all its records written, in the order ``evaluate`` runs them
    (so a skip's breaking record is rescored before the skip)."""
    units = []
    for number, start in enumerate(range(0, len(data), config.batch_size)):
        batch = Batch(config, data, list(range(start, min(start + config.batch_size, len(data)))), number,
                      device, files, records, None)
        for spec in config.defenses:
            for attack in (a for a in config.attacks if a.applies_to(spec.name)):
                unit = Unit(batch, spec, attack, defenses[spec.name])
                if all(key in records for key in unit.keys):
                    units.append(unit)
    return units


def _plan(units: list[Unit], draws: int, total: int) -> Tally:
    """What a rescore of ``units`` will do, found without running a model (a skip's fate waits
    on its breaking record's new draws: counted under ``skips``)."""
    tally = Tally(draws, total)
    for unit in units:
        way, attacked = unit.way(draws), set(unit.attacked)
        for p in unit.lacking(draws):
            tally.outcomes[way if p in attacked else "skips"].append(unit.keys[p])
        _count_cost(tally, unit, way)
    return tally


def _count_cost(tally: Tally, unit: Unit, way: str | None) -> None:
    """Add a unit's purifications (its attacked samples x the selection draws) and, for a
    transfer attack, the batch it recrafts on its victim (once per batch and victim)."""
    if way != "scored":
        return
    tally.purifications[unit.spec.name] += len(unit.attacked) * tally.draws
    if unit.attack.kind == "transfer":
        tally.transfer_batches.add((*crafted_key(unit.spec, unit.attack, unit.batch.config), unit.batch.number))


def _other_precisions(units: list[Unit], draws: int, legacy: dict, precision: str) -> set[str]:
    """The resolved precisions, other than ``precision``, of the records whose selection draws
    would be computed here (copied draws are exact at any precision)."""
    return {record_stamp(unit.records[p], legacy)[1] for unit in units if unit.way(draws) == "scored"
            for p in unit.attacked} - {precision}


def _precision_lines(others: set[str], machine: dict) -> list[str]:
    """Why a rescore here is refused without ``--any-precision`` (none where precisions match)."""
    if not others:
        return []
    return [f"its records were made at {', '.join(sorted(others))} but this machine resolves "
            f"{machine['resolved_precision']} ({describe_hardware(machine)}): selection draws here would not be "
            "the ones a new run makes there; rescore on a machine that resolves the records' precision, or "
            "pass --any-precision (the records and sessions.jsonl then say so)"]


def _append_session(files: RunDirectory, machine: dict, draws: int, any_precision: bool) -> None:
    """Note this rescore in ``sessions.jsonl``: when, on what, with how many draws, and whether at
    another precision than the records'."""
    line = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "processes": 1, "hardware": machine,
            RESCORE: {"selection_draws": draws, "distpure": package_version(), "any_precision": any_precision}}
    with open(files.sessions, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line, sort_keys=True) + "\n")


def _store_selection_draws(files: RunDirectory, config: ExperimentConfig, draws: int) -> None:
    """Record more selection draws than the run had in its ``config.yaml`` and ``resolved.json``,
    so that what it appends later draws as many."""
    config.evaluation.selection_draws = draws
    files.config.write_text(dump_yaml(asdict(config)))
    resolved = json.loads(files.resolved.read_text())
    resolved["settings"]["evaluation"] = asdict(config.evaluation)
    files.resolved.write_text(json.dumps(resolved, indent=2, sort_keys=True))


def _rescore_unit(unit: Unit, draws: int, crafted: dict[tuple[str, str], Crafted], precision: str,
                  legacy: dict, tally: Tally) -> bool:
    """Give one unit's records their selection draws (see the module) and count each; whether any
    record changed."""
    before, lacking, way = unit.records, unit.lacking(draws), unit.way(draws)
    written = unit.batch.written
    selections = _selection_draws(unit, draws, crafted) if way in ("copied", "scored") else None
    _count_cost(tally, unit, way if selections is not None else None)
    for p, selection in zip(unit.attacked, selections or []):
        mark = {PRECISION_FIELD: precision} if not unit.shared_draw and record_stamp(
            before[p], legacy)[1] != precision else {}
        written[unit.keys[p]] = {**before[p], SELECTION_FIELD: selection, **mark}
    for p in lacking:
        key, record = unit.keys[p], written[unit.keys[p]]
        if "skipped_by" in record:
            breaker = written.get((key[0], key[1], record["skipped_by"]), {})
            refreshed = {**record, **{f: breaker[f] for f in (SELECTION_FIELD, PRECISION_FIELD) if f in breaker}}
            problem = skip_problem(refreshed, written, unit.batch.config)
            written[key] = record if problem else refreshed
        tally.outcomes[_outcome(unit, p, draws, way)].append(key)
    return any(written[key] is not record for key, record in zip(unit.keys, before))


def _outcome(unit: Unit, position: int, draws: int, way: str | None) -> str:
    """What became of a record that lacked selection draws, once its unit is rescored."""
    record = unit.records[position]
    if position not in unit.lacking(draws):
        return "skips" if "skipped_by" in record else way
    if skip_problem(record, unit.batch.written, unit.batch.config):
        return "stale"
    return "unkept"


def _selection_draws(unit: Unit, draws: int, crafted: dict[tuple[str, str], Crafted]) -> list[list[int]] | None:
    """Per attacked sample, its selection draws as a new run makes them: the scoring draw where
    attacker and scorer share one, else ``draws`` draws of the unit's selection stream on its
    examples (None where its kept examples cannot be read)."""
    records, attacked = unit.records, unit.attacked
    if unit.shared_draw:
        return [list(records[p]["predictions"]) for p in attacked]
    examples = _examples(unit, crafted)
    if examples is None:
        return None
    seed = unit_seed(unit.batch.config, unit.spec.name, unit.attack.name, unit.batch.number)
    return predict_draws(scorers(unit.defense, draws, selection_stream(seed)), examples[attacked])


def _examples(unit: Unit, crafted: dict[tuple[str, str], Crafted]) -> torch.Tensor | None:
    """The unit's examples of the whole batch as ``evaluate`` gets them: the clean images or
    transfer examples recrafted on the victim (shared by the defences behind it), or an adaptive
    attack's kept examples (None where they cannot be read)."""
    if unit.attack.kind in KINDS_NOT_KEPT:
        return adversarial_examples(unit.batch, unit.defense, unit.spec, unit.attack, crafted).examples
    return kept_examples(unit.batch, unit.spec.name, unit.attack.name, unit.attacked)


def _refresh_summary(files: RunDirectory, config: ExperimentConfig, records: list[dict], tally: Tally) -> None:
    """Rewrite a finished run's ``summary.json`` from the rescored records; with stale skips the
    run is unfinished again (no summary) until ``evaluate`` reruns their attacks."""
    if tally.outcomes["stale"]:
        files.summary.unlink(missing_ok=True)
    elif files.summary.is_file():
        write_summary(files, config, records, files.read_metadata().get("hardware"))


def _format(tally: Tally, files: RunDirectory, config: ExperimentConfig, dry: bool) -> str:
    """What a rescore did (or, ``dry``, will do): records by outcome, purifications, and the
    records left with the old split named by defence and attack."""
    outcomes = {name: len(keys) for name, keys in tally.outcomes.items()}
    outcomes["done"] = tally.records - sum(n for name, n in outcomes.items() if name != "done")
    lines = [f"{files.root}: {tally.records} records; {tally.draws} selection draws per example "
             "(one where the defence draws no noise)"]
    for name, label in OUTCOMES.items():
        if outcomes[name] or name == "scored":
            lines.append(f"  {DRY_SKIPS if dry and name == 'skips' else label}: {outcomes[name]}")
    unkept = Counter((defense, attack) for _, defense, attack in tally.outcomes["unkept"])
    if unkept:
        lines.append("    " + ", ".join(f"{d} / {a} ({n})" for (d, a), n in unkept.items()))
    lines.append(f"  purifications: {sum(tally.purifications.values())}"
                 + (f" (and {len(tally.transfer_batches)} transfer batch(es) recrafted on the victim first)"
                    if tally.transfer_batches else ""))
    if dry:
        lines.append(_estimate_line(tally, files, config))
    return "\n".join(lines)


def _estimate_line(tally: Tally, files: RunDirectory, config: ExperimentConfig) -> str:
    """How long the purifications will take at the run's own speed: per defence, the seconds its
    clean units took per purification (they do nothing else) in ``timings.jsonl``."""
    clean = {a.name for a in config.attacks if a.kind == "clean"}
    rates = {row["defense"]: row["seconds"] / (row["attacked"] * config.evaluation.draws)
             for row in time_summary(files.read_timings())["pairs"] if row["attack"] in clean and row["attacked"]}
    purifications = tally.purifications
    unknown = sorted(d for d in purifications if d not in rates)
    seconds = sum(n * rates[d] for d, n in purifications.items() if d in rates)
    machines = "; ".join(dict.fromkeys(describe_hardware(s["hardware"])
                                       for s in evaluation_sessions(files.read_sessions()))) or "unknown hardware"
    return (f"estimated time: {duration(seconds)} at the run's own speed per process ("
            + ", ".join(f"{d} {rates[d]:.3f} s" for d in purifications if d in rates)
            + f" per purification, from its clean units, measured on {machines})"
            + (f"; not estimated (no clean units timed): {', '.join(unknown)}" if unknown else ""))


def _next_step(files: RunDirectory, config: ExperimentConfig, records: dict[Key, dict], tally: Tally) -> str:
    """What to run next: ``evaluate --new-resumption`` where skips went stale, else the report."""
    stale = tally.outcomes["stale"]
    if stale:
        return (f"{stale_skips_text(stale, records, config)}: distpure evaluate {files.config} --out {files.root} "
                "--new-resumption reruns their attacks")
    return f"next: distpure report {files.root}"
