"""``distpure rescore`` on the tiny models and folder dataset of test_evaluation: a run recorded
without selection draws, rescored, holds the records a new run writes; a stopped rescore
continues; a dry run writes nothing; another precision is refused unless allowed; records without
kept examples keep the old split; a skip whose breaking record no longer breaks is stale, and
``evaluate --new-resumption`` reruns its attack."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from distpure.cli.main import main
from distpure.evaluation import rescore as rescore_module
from distpure.evaluation.config import load_experiment
from distpure.evaluation.protocol import SELECTION_FIELD
from distpure.evaluation.records import read_records, record_key, write_sorted
from distpure.evaluation.rescore import PRECISION_FIELD, rescore
from distpure.evaluation.runner import run_experiment
from distpure.evaluation.summary import summarize
from distpure.reporting.report import write_report
from test_evaluation import DRAWS, assets, experiment, single_thread, write_yaml  # noqa: F401  (fixtures)

T_STAR = 100
SELECTION_DRAWS = 4
# noisier than test_evaluation's purifier, so that its draws disagree and a wrong stream shows
DEFENSES = [{"name": "none", "kind": "none"},
            {"name": "purified", "kind": "purifier", "purifier": {"t_star": T_STAR, "num_steps": 2}}]


@pytest.fixture(scope="module")
def new_run(assets, tmp_path_factory) -> Path:  # noqa: F811
    """A cascaded tiny run recorded with selection draws, as this version records one."""
    values = experiment(assets, defenses=DEFENSES, evaluation={"draws": DRAWS, "selection_draws": SELECTION_DRAWS,
                                                                "cascade": True})
    root = tmp_path_factory.mktemp("rescore")
    run_dir = root / "new"
    run_experiment(load_experiment(write_yaml(root / "cascade.yaml", values)), run_dir, show_progress=False)
    return run_dir


def _old_run(new_run: Path, run_dir: Path) -> Path:
    """``new_run`` as a version before selection draws left it: the same records without them."""
    shutil.copytree(new_run, run_dir)
    records = read_records(run_dir / "results.jsonl")
    write_sorted([{k: v for k, v in r.items() if k != SELECTION_FIELD} for r in records], run_dir / "results.jsonl")
    return run_dir


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_rescored_run_holds_the_records_a_new_run_writes(new_run, tmp_path):
    assert any(len(set(r[SELECTION_FIELD])) > 1 for r in read_records(new_run / "results.jsonl"))  # draws differ
    run_dir = _old_run(new_run, tmp_path / "old")
    text = rescore(run_dir, show_progress=False)
    assert read_records(run_dir / "results.jsonl") == read_records(new_run / "results.jsonl")
    assert "stale" not in text and "old split" not in text and "next: distpure report" in text
    assert read_records(run_dir / "sessions.jsonl")[-1]["rescore"]["selection_draws"] == SELECTION_DRAWS
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads((new_run / "summary.json").read_text())
    assert "rescored (" in write_report(run_dir).read_text()
    assert "with their selection draws already: " + str(len(read_records(new_run / "results.jsonl"))) \
        in rescore(run_dir, show_progress=False)  # nothing left to do


def test_a_stopped_rescore_continues_where_it_stopped(new_run, tmp_path, monkeypatch):
    run_dir = _old_run(new_run, tmp_path / "old")
    rescore_unit, calls = rescore_module._rescore_unit, []

    def stopping(*args):
        calls.append(args)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return rescore_unit(*args)

    monkeypatch.setattr(rescore_module, "_rescore_unit", stopping)
    with pytest.raises(KeyboardInterrupt):
        rescore(run_dir, show_progress=False)
    monkeypatch.undo()
    kept = sum(SELECTION_FIELD in r for r in read_records(run_dir / "results.jsonl"))
    assert kept > 0
    text = rescore(run_dir, show_progress=False)
    assert f"with their selection draws already: {kept}" in text
    assert read_records(run_dir / "results.jsonl") == read_records(new_run / "results.jsonl")


def test_a_dry_run_counts_and_writes_nothing(new_run, tmp_path, capsys):
    run_dir = _old_run(new_run, tmp_path / "old")
    before = _files(run_dir)
    assert main(["rescore", str(run_dir), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert _files(run_dir) == before
    records = read_records(run_dir / "results.jsonl")
    scored = [r for r in records if r["defense"] == "purified" and "skipped_by" not in r]
    copied = [r for r in records if r["defense"] == "none" and "skipped_by" not in r]
    skips = [r for r in records if "skipped_by" in r]
    assert skips and f"from their examples: {len(scored)}\n" in text
    assert f"the scoring draw): {len(copied)}\n" in text and f"(else stale): {len(skips)}\n" in text
    assert f"purifications: {len(scored) * SELECTION_DRAWS} (and 3 transfer batch(es)" in text
    assert "estimated time: " in text and "purified " in text and "dry run: nothing written" in text


def test_another_precision_is_refused_unless_allowed(new_run, tmp_path):
    run_dir = _old_run(new_run, tmp_path / "old")
    records = read_records(run_dir / "results.jsonl")
    write_sorted([{**r, "precision": "fp16"} for r in records], run_dir / "results.jsonl")
    with pytest.raises(ValueError, match="made at fp16 but this machine resolves (fp32|bf16)"):
        rescore(run_dir, show_progress=False)
    assert "fp16 but this machine" in rescore(run_dir, dry_run=True)
    rescore(run_dir, any_precision=True, show_progress=False)
    rescored = read_records(run_dir / "results.jsonl")
    marked = {r[PRECISION_FIELD] for r in rescored if r["defense"] == "purified"}
    assert marked in ({"fp32"}, {"bf16"}) and not any(PRECISION_FIELD in r for r in rescored if r["defense"] == "none")
    assert read_records(run_dir / "sessions.jsonl")[-1]["rescore"]["any_precision"] is True
    assert "another precision than the records'" in write_report(run_dir).read_text()


def test_records_without_kept_examples_keep_the_old_split(new_run, tmp_path):
    run_dir = _old_run(new_run, tmp_path / "old")
    (run_dir / "crafted" / "purified__pgd" / "batch0001.safetensors").unlink()
    text = rescore(run_dir, show_progress=False)
    left = [r for r in read_records(run_dir / "results.jsonl") if SELECTION_FIELD not in r]
    unit = [r for r in read_records(new_run / "results.jsonl") if (r["defense"], r["attack"]) == ("purified", "pgd")
            and r["index"] // 4 == 1 and "skipped_by" not in r]
    assert unit and {record_key(r) for r in left} == {record_key(r) for r in unit}
    assert f"left with the old split (no kept examples): {len(unit)}\n    purified / pgd ({len(unit)})" in text
    assert summarize(read_records(run_dir / "results.jsonl"), load_experiment(run_dir / "config.yaml"))["rows"]


def test_a_skip_whose_breaking_record_no_longer_breaks_is_stale(new_run, tmp_path):
    """An old run skipped on all R scoring draws wrong; rescored, the breaking record's selection
    draws see a right one: the skip is stale, refused by the summary and by a plain resume, and
    ``evaluate --new-resumption`` reruns its attack to the records a new run holds."""
    run_dir = _old_run(new_run, tmp_path / "old")
    fresh = {record_key(r): r for r in read_records(new_run / "results.jsonl")}
    key = next((i, d, a) for (i, d, a), r in fresh.items()  # attacked by pgd, its transfer example right once
               if (d, a) == ("purified", "pgd") and "skipped_by" not in r
               and "skipped_by" not in fresh[i, d, "transfer"] and r["label"] in fresh[i, d, "transfer"][SELECTION_FIELD])
    records = {record_key(r): r for r in read_records(run_dir / "results.jsonl")}
    breaker = {**records[key[0], "purified", "transfer"], "predictions": [1 - records[key]["label"]] * DRAWS}
    records[key[0], "purified", "transfer"] = breaker
    records[key] = {**breaker, "attack": "pgd", "skipped_by": "transfer"}
    write_sorted(list(records.values()), run_dir / "results.jsonl")
    config = load_experiment(run_dir / "config.yaml")
    summarize(list(records.values()), config)  # the old skip holds on the old split

    text = rescore(run_dir, show_progress=False)
    assert "1 cascade skip(s) no longer hold" in text and "--new-resumption reruns their attacks" in text
    assert not (run_dir / "summary.json").exists()
    with pytest.raises(ValueError, match="no longer breaks it"):
        summarize(read_records(run_dir / "results.jsonl"), config)
    with pytest.raises(ValueError, match="pass --new-resumption"):
        run_experiment(config, run_dir, show_progress=False)
    run_experiment(config, run_dir, show_progress=False, new_resumption=True)
    rerun = {record_key(r): r for r in read_records(run_dir / "results.jsonl")}
    assert rerun[key] == fresh[key]
    edited = (key[0], "purified", "transfer")
    assert {k: r for k, r in rerun.items() if k != edited} == {k: r for k, r in fresh.items() if k != edited}
