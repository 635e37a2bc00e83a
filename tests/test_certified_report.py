"""The certification report on made-up records: its table's figures against hand-computed ones
(radius comparison, denominators), the empirical figures read from an evaluation's results.csv,
the L∞ caveat, the envelope over σ and a stopped run (nothing here runs a model)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from distpure.certification.config import CertifyConfig
from distpure.certification.paired import compare_at
from distpure.cli.main import main
from distpure.config import from_dict
from distpure.reporting.certified import linf_radius, write_certified_report
from distpure.reporting.certified_run import CertifiedRun
from distpure.reporting.certified_plot import certified_curves, curve_radii, envelopes
from distpure.reporting.empirical import read_rows, threat_figures

CONFIG = {"name": "synthetic", "data": {"dataset": "cifar10", "limit": 10}, "n0": 10, "n": 100, "alpha": 0.1,
          "radii": [0.0, 0.25, "128/255"],
          "settings": [{"name": "a", "denoiser": "one-shot", "sigma": 0.25, "reach": 0.25},
                       {"name": "b", "denoiser": "one-shot", "sigma": 0.5},
                       {"name": "c", "denoiser": "multistep", "sigma": 0.25, "steps": 2, "reach": 0.25, "limit": 4}]}
# setting a: certified at 0.25 exactly (counts at r = 0.25), 0.3, 0.1; one abstention; one skipped
A = [(True, 0.25, False, False), (True, 0.3, False, False), (True, 0.1, False, True), (False, None, False, False),
     (False, None, True, False)]
B = [(True, 0.6, False, False), (True, 0.2, False, False)]
LEVEL = {"label": 144, "timestep": 144, "alpha_bar": 0.8, "continuous": False, "model_noise": 0.5, "sigma": 0.25}


# right selection draws (of n0 = 10) per record of a and b
RIGHT = {"a": [10, 9, 7, 4, 2], "b": [10, 8]}


def _record(setting: str, index: int, correct: bool, radius: float | None, skipped: bool, curtailed: bool) -> dict:
    right = RIGHT.get(setting, [10] * 10)[index]
    return {"setting": setting, "index": index, "dataset_index": 100 + index, "sigma": 0.25, "label": 1,
            "selection_counts": [10 - right, right],
            "predicted": 1 if not skipped else 2, "correct": correct, "radius": radius,
            "abstained": not correct, "skipped": skipped, "curtailed": curtailed,
            "seconds": float(index + 1), "denoiser_calls": 10 * (index + 1)}


def _honest(root: Path) -> Path:
    """An evaluation's results.csv: a frozen-noise row and an empty one must not count."""
    rows = [("diffpure", "clean", "clean", "linf", 8 / 255, False, 128, 0.75, 8),
            ("diffpure", "pgd-l2", "pgd", "l2", 128 / 255, False, 128, 0.5, 8),
            ("diffpure", "pgd-l2-long", "pgd", "l2", 128 / 255, False, 128, 0.4, 8),
            ("diffpure", "frozen-l2", "pgd", "l2", 128 / 255, True, 128, 0.1, 1),
            ("diffpure", "unrun-l2", "pgd", "l2", 128 / 255, False, 0, "", 0),
            ("diffpure", "worst-case-l2-0.501961", "worst-case", "l2", 128 / 255, False, 128, 0.45, 4),
            ("diffpure", "resubmission-l2-0.501961", "resubmission", "l2", 128 / 255, False, 128, 0.05, 8),
            ("diffpure", "worst-case-linf-0.0313725", "worst-case", "linf", 8 / 255, False, 128, 0.1171875, 4),
            ("no-defense", "pgd-l2", "pgd", "l2", 128 / 255, False, 128, 0.0, 1)]
    root.mkdir()
    with (root / "results.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["defense", "attack", "kind", "norm", "eps", "frozen_noise", "total", "accuracy", "ci_low",
                         "ci_high", "draws", "scoring"])
        for defence, attack, kind, norm, eps, frozen, total, accuracy, draws in rows:
            low, high = (accuracy - 0.05, accuracy + 0.05) if accuracy != "" else ("", "")
            writer.writerow([defence, attack, kind, norm, eps, frozen, total, accuracy, low, high, draws, "expected"])
    return root


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    (root / "resolved.json").write_text(json.dumps({"settings": {"settings": {
        "a": {"noise_level": LEVEL, "purifier": None}, "c": {"noise_level": LEVEL, "purifier": {"num_steps": 2}}}}}))
    (root / "sessions.jsonl").write_text(json.dumps({"processes": 1, "planned": {"a": 10, "b": 2, "c": 4},
                                                     "image_shape": [3, 32, 32], "hardware": {
        "device": "cpu", "cpu": "Test CPU 9000", "torch_threads": 1, "precision": "auto",
        "resolved_precision": "fp32", "native_bf16": False}}) + "\n")
    records = [_record("a", i, *r) for i, r in enumerate(A)] + [_record("b", i, *r) for i, r in enumerate(B)]
    (root / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _row(report: str, name: str) -> list[str]:
    """The cells of the first table row of setting ``name``."""
    line = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split(" | ")]


def _wilson(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    p, d = correct / total, 1 + z * z / total
    centre, half = (p + z * z / (2 * total)) / d, z * math.sqrt(p * (1 - p) / total + z * z / (4 * total**2)) / d
    return centre - half, centre + half


def test_the_table_holds_the_hand_computed_figures(run_dir: Path, tmp_path: Path) -> None:
    report = write_certified_report(run_dir, empirical=_honest(tmp_path / "honest")).read_text()
    cells = _row(report, "a")
    # every image with a record counts, the skipped one too: 3 of 5 at r = 0, 2 of 5 at r = 0.25
    # (a radius of exactly 0.25 counts there); 128/255 is beyond a's reach (0.49994 at n = 100)
    low, high = _wilson(2, 5)
    assert cells[:5] == ["a", "5/10", f"60.0 [{100 * _wilson(3, 5)[0]:.1f}, {100 * _wilson(3, 5)[1]:.1f}]",
                         f"40.0 [{100 * low:.1f}, {100 * high:.1f}]", "–"]
    assert _row(report, "b")[1:5] == ["2/2", "100.0 [34.2, 100.0]", "50.0 [9.5, 90.5]", "50.0 [9.5, 90.5]"]
    assert _row(report, "c")[1:] == ["0/4", "–", "–", "–"]
    settings = report[report.index("## Settings and cost"):].split("\n")
    a = _row("\n".join(settings), "a")
    # abstentions among the 4 estimated images; 1 skipped, 1 curtailed; means over the 5 images
    assert a[1:] == ["one-shot x̂0", "0.25", "step 144: √((1−ᾱ)/ᾱ) = 0.500 (2σ = 0.5)", "100", "0.500", "5/10",
                     "25.0 % (1/4)", "1", "1", "3.0", "30.0"]
    assert _row("\n".join(settings), "c")[1] == "multistep, 2 steps"
    assert "Test CPU 9000" in report and "**Partial run**" in report
    assert (run_dir / "certified_accuracy.png").stat().st_size > 0


def test_the_base_classifier_section_holds_the_hand_computed_ceilings(run_dir: Path) -> None:
    records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    for record in records:
        record["sigma"] = {"a": 0.25, "b": 0.5}[record["setting"]]
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report = write_certified_report(run_dir, empirical=None).read_text()
    section = report[report.index("## The base classifier"):report.index("## Settings and cost")]
    shares = [0.01 * 10 * right for right in RIGHT["a"]]
    mean, half = sum(shares) / 5, 1.959964 * math.sqrt(sum((x - 0.64) ** 2 for x in shares) / 4 / 5)
    # a (σ 0.25): ceilings ∞, 0.25·Φ⁻¹(0.9) = 0.320, 0.25·Φ⁻¹(0.7) = 0.131, none, none
    assert _row(section, "a") == ["a", "0.25", "5", f"{100 * mean:.1f} [{100 * (mean - half):.1f}, "
                                  f"{100 * (mean + half):.1f}]", "60.0", "40.0", "20.0"]
    # b (σ 0.5): ceilings ∞ and 0.5·Φ⁻¹(0.8) = 0.421, short of 128/255; c has no records
    assert _row(section, "b")[2:] == ["2", "90.0 [70.4, 100.0]", "100.0", "100.0", "50.0"]
    assert "\n| c |" not in section and "97.767 % at σ = 0.25, 84.229 % at σ = 0.5" in section


def test_empirical_figures_are_read_not_typed(tmp_path: Path) -> None:
    rows = read_rows(_honest(tmp_path / "honest"))
    (figures,) = threat_figures(rows, "l2", 128 / 255, defences=("pgd-at", "diffpure"))
    assert figures.defence == "diffpure" and figures.clean.accuracy == 0.75
    assert (figures.strongest.attack, figures.strongest.accuracy) == ("pgd-l2-long", 0.4)  # not the frozen row
    assert (figures.picked.accuracy, figures.picked.draws, figures.resubmission.accuracy) == (0.45, 4, 0.05)
    assert read_rows(tmp_path / "absent") is None


def test_the_report_sets_empirical_upper_bounds_beside_and_says_when_absent(run_dir: Path, tmp_path: Path) -> None:
    report = write_certified_report(run_dir, empirical=_honest(tmp_path / "honest")).read_text()
    diffpure = _row(report, "diffpure")
    assert diffpure[2:] == ["40.0 [35.0, 45.0] (pgd-l2-long)", "45.0 [40.0, 50.0]", "5.0 [0.0, 10.0]"]
    assert "**upper bounds**" in report and "**lower bounds**" in report and "scored on the 4 other draws" in report
    assert "Certified at L2 128/255: one-shot 50.0 [9.5, 90.5] (b, 2 images)" in report
    absent = write_certified_report(run_dir, empirical=tmp_path / "absent").read_text()
    assert "No empirical figures to compare" in absent and "absent" in absent


def test_the_linf_caveat_is_computed(run_dir: Path, tmp_path: Path) -> None:
    assert 255 * linf_radius(0.5, 3 * 32 * 32) == pytest.approx(2.30, abs=0.005)
    report = write_certified_report(run_dir, empirical=_honest(tmp_path / "honest")).read_text()
    assert "d = 3072" in report and "L2 128/255 → L∞ 2.3/255" in report
    # L∞ 8/255 needs L2 8/255 * sqrt(3072) = 1.739, beyond b's reach of 1.0
    assert "8/255 × √d = 1.739, beyond every setting's reach" in report and "diffpure 11.7" in report


def test_the_envelope_is_the_best_sigma_of_each_denoiser(run_dir: Path) -> None:
    run = CertifiedRun.load(run_dir)
    radii = curve_radii(run.records, 1.0)
    assert radii == (0.0, 0.1, 0.2, 0.25, 0.3, 0.6, 1.0)
    curves = certified_curves(run.records, ["a", "b", "c"], radii)
    assert set(curves) == {"a", "b"}  # c has no records
    assert curves["a"] == [0.6, 0.6, 0.4, 0.4, 0.2, 0.0, 0.0]
    assert curves["b"] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.0]
    kinds = {"a": "one-shot", "b": "one-shot", "c": "multistep"}
    assert envelopes(curves, kinds) == {"one-shot": [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.0]}
    assert envelopes({"a": curves["a"]}, kinds) == {}  # one setting: its own curve, no envelope


def test_a_run_from_before_sessions_recorded_plans_uses_the_config(run_dir: Path) -> None:
    (run_dir / "sessions.jsonl").write_text("")
    assert CertifiedRun.load(run_dir).planned == {"a": 10, "b": 10, "c": 4}


def test_distpure_report_recognises_a_certification_run(run_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["report", str(run_dir), "--empirical", str(tmp_path / "absent")]) == 0
    assert "report.md" in capsys.readouterr().out and (run_dir / "report.md").is_file()
    assert main(["report", str(run_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["settings"]["c"]["certified"]["0"]["value"] is None  # no records: null, not NaN
    assert summary["settings"]["a"]["certified"]["0.25"]["correct"] == 2


def test_the_run_section_labels_the_fine_tuned_victim(run_dir: Path, tmp_path: Path) -> None:
    """A named victim shows as its name; the committed fine-tuned config's victim, a weights file,
    as its architecture with those weights, under a description that says fine-tuned."""
    absent = tmp_path / "absent"
    named = write_certified_report(run_dir, empirical=absent).read_text()
    assert "- models: victim `cifar10-resnet18`, diffusion" in named
    committed = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "cifar10-certify-finetuned.yaml")
                               .read_text())
    config = {**CONFIG, "models": committed["models"], "description": committed["description"]}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    report = write_certified_report(run_dir, empirical=absent).read_text()
    assert ("- models: victim `cifar10-resnet18` with the weights `results/cifar10-resnet18-denoised/model.safetensors`, "
            "diffusion `cifar10-ddpm-small`") in report
    assert report.startswith("# synthetic: certified L2 accuracy\n\nThe fine-tuned victim (a separate, labelled row;")


def _other_run(root: Path, outcomes: dict[int, tuple[bool, float | None, bool]], config: dict | None = None,
               **resolved) -> Path:
    """Another run whose setting ``a-other`` is resolved as the fixture's ``a`` and ``c-other`` as
    its ``c`` but for one more reverse step; records by dataset index: (correct, radius, skipped),
    written in reverse order so that a record's position differs from the fixture's."""
    root.mkdir()
    settings = [{**CONFIG["settings"][0], "name": "a-other"}, {**CONFIG["settings"][2], "name": "c-other"}]
    (root / "config.yaml").write_text(yaml.safe_dump({**CONFIG, "name": "other", "settings": settings, **(config or {})}))
    (root / "resolved.json").write_text(json.dumps({"settings": {"settings": {
        "a-other": {"noise_level": LEVEL, "purifier": None},
        "c-other": {"noise_level": LEVEL, "purifier": {"num_steps": 3}}}, **resolved}}))
    records = [{**_record("a-other", position, correct, radius, skipped, False), "dataset_index": index}
               for position, (index, (correct, radius, skipped)) in enumerate(reversed(outcomes.items()))]
    (root / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _exact_mcnemar(only_ours: int, only_theirs: int) -> float:
    """Twice the smaller binomial tail of the discordant split at 1/2, at most 1."""
    total = only_ours + only_theirs
    tail = sum(math.comb(total, k) for k in range(min(only_ours, only_theirs) + 1)) / 2**total
    return min(1.0, 2 * tail)


def test_compare_at_counts_the_discordant_images_and_tests_them() -> None:
    def pair(ours: bool, theirs: bool) -> tuple[dict, dict]:
        return tuple({"correct": won, "radius": 0.5 if won else None} for won in (ours, theirs))

    pairs = [pair(True, False)] * 10 + [pair(False, True)] + [pair(True, True)] * 3 + [pair(False, False)] * 6
    result = compare_at(0.25, pairs)
    assert (result.ours, result.theirs, result.only_ours, result.only_theirs) == (13, 4, 10, 1)
    assert result.p_value == pytest.approx(_exact_mcnemar(10, 1)) and result.p_value == pytest.approx(24 / 2048)
    assert result.difference.mean == pytest.approx(9 / 20) and result.difference.low < 9 / 20 < result.difference.high
    assert compare_at(0.6, pairs).p_value == 1.0  # nobody certified that far: no discordant image


def _paired_section(run_dir: Path, paired_with: str) -> str:
    values = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**values, "paired_with": paired_with}))
    report = write_certified_report(run_dir, empirical=None).read_text()
    return report[report.index(f"## Paired with `{paired_with}`"):report.index("## What an L2")]


def test_the_report_pairs_a_setting_with_the_same_smoothing_of_another_run(run_dir: Path, tmp_path: Path,
                                                                            monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # paired_with is relative to the working directory
    # shared dataset indices 101-104; ours there: (True, 0.3), (True, 0.1), abstained, skipped
    _other_run(tmp_path / "other", {101: (False, None, False), 102: (True, 0.6, False), 103: (True, 0.3, False),
                                    104: (False, None, True), 105: (True, 0.9, False)})
    section = _paired_section(run_dir, "other")
    rows = [line for line in section.splitlines() if line.startswith("| a |")]
    # r = 0: both certify 2 of the 4 shared images, 101 only here, 103 only there;
    # r = 0.25: here 101 alone, there 102 and 103; 128/255 is beyond a's reach
    assert [row.split(" | ")[:7] + row.split(" | ")[8:] for row in rows] == [
        ["| a", "a-other", "4", "0", "50.0", "50.0", "1 / 1", "1 |"],
        ["| a", "a-other", "4", "0.25", "25.0", "50.0", "1 / 2", "1 |"]]
    assert rows[1].split(" | ")[7].startswith("-25.0 [")  # here - there, in points
    # c's one reverse step more there, b's σ found nowhere: not paired
    assert "Not paired (`other` has no setting resolved the same way): b, c." in section


@pytest.mark.parametrize("resolved, config, expected", [
    ({"alpha": 0.01}, None, "resolved the same way): a, b, c."),
    ({"n0": 50}, None, "resolved the same way): a, b, c."),
    ({"resolved_precision": "bf16"}, None, "resolved the same way): a, b, c."),
    ({}, {"data": {"dataset": "imagenet30", "limit": 10}}, "Not comparable image by image: dataset 'cifar10' here"),
    ({}, {"models": {"victim": "cifar10-resnet18", "diffusion": "cifar10-ddpm"}}, "diffusion model"),
])
def test_a_run_of_another_procedure_or_input_is_not_paired(run_dir: Path, tmp_path: Path, monkeypatch,
                                                           resolved: dict, config: dict | None, expected: str) -> None:
    monkeypatch.chdir(tmp_path)
    _other_run(tmp_path / "strict", {101: (True, 0.6, False)}, config=config, **resolved)
    section = _paired_section(run_dir, "strict")
    assert "| a | a-other |" not in section and expected in section


def test_a_paired_run_that_is_not_a_certification_is_named_not_read(run_dir: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "honest").mkdir()
    (tmp_path / "honest" / "config.yaml").write_text(yaml.safe_dump({"name": "honest", "defenses": []}))
    assert "`absent` holds no certification run here" in _paired_section(run_dir, "absent")
    assert "`honest` holds no certification run here" in _paired_section(run_dir, "honest")


def test_paired_with_must_name_a_directory() -> None:
    with pytest.raises(ValueError, match="paired_with"):
        from_dict(CertifyConfig, {**CONFIG, "paired_with": ""})


def test_the_configs_compare_pairs_are_reported_image_by_image(run_dir: Path) -> None:
    values = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**values, "compare": [["b", "a"], ["c", "a"]]}))
    report = write_certified_report(run_dir, empirical=None).read_text()
    section = report[report.index("## Settings compared image by image"):report.index("## What an L2")]
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in section.splitlines()
            if line.startswith(("| b |", "| c |"))]
    # shared dataset indices 100, 101: b certifies 0.6 and 0.2, a 0.25 and 0.3; 128/255 is beyond a's reach
    assert [row[:7] + row[8:] for row in rows] == [
        ["b", "a", "2", "0", "100.0", "100.0", "0 / 0", "1"],
        ["b", "a", "2", "0.25", "50.0", "100.0", "0 / 1", "1"],
        ["c", "a", "0", "–", "–", "–", "–", "–"]]
    assert rows[1][7].startswith("-50.0 [")


@pytest.mark.parametrize("pair", [["a", "a"], ["a", "z"], ["a"], "a,b"])
def test_a_compare_pair_must_name_two_settings_of_the_run(pair) -> None:
    with pytest.raises(ValueError, match="compare"):
        from_dict(CertifyConfig, {**CONFIG, "compare": [pair]})
