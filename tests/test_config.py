"""Experiment files are validated when they are read: every bad value fails at once, naming the
value, the defence or attack it belongs to and the valid choices; ``--set`` reaches list items
by name. Nothing here loads a model."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distpure.config import dump_yaml, load_yaml, parse_overrides
from distpure.evaluation.config import load_experiment

DEFENSES = [{"name": "none", "kind": "none"},
            {"name": "purified", "purifier": {"guidance": "victim", "num_steps": 2}},
            {"name": "jpeg", "kind": "preprocessing", "preprocessing": {"name": "jpeg", "quality": 75}}]
ATTACKS = [{"name": "clean", "kind": "clean"},
           {"name": "pgd", "kind": "pgd", "steps": 2, "eot": 2},
           {"name": "st", "kind": "surrogate", "surrogate": {"target": "straight-through"}},
           {"name": "aa", "kind": "autoattack", "version": "rand", "attacks_to_run": ["apgd-ce"]}]


def write_experiment(path: Path, defenses: list[dict] = DEFENSES, attacks: list[dict] = ATTACKS,
                     **settings) -> Path:
    path.write_text(yaml.safe_dump({"name": "checks", "defenses": defenses, "attacks": attacks,
                                    **settings}, sort_keys=False))
    return path


def with_setting(items: list[dict], name: str, **settings) -> list[dict]:
    """``items`` with ``settings`` merged into the item called ``name``."""
    return [{**item, **settings} if item["name"] == name else item for item in items]


def case_id(name: str, settings: dict) -> str:
    """``aa-{norm: Linf}``: the item and its bad settings."""
    return f"{name}-{yaml.safe_dump(settings, default_flow_style=True).strip()}"


def test_a_valid_experiment_loads_with_its_purifier_settings_resolved(tmp_path: Path) -> None:
    config = load_experiment(write_experiment(tmp_path / "ok.yaml", precision="fp32"))
    purifier = config.purifier_config(config.defenses[1])
    # the CIFAR-10 recommendation (t* = 75, scale 10), the experiment's precision, the override
    assert (purifier.t_star, purifier.victim_scale, purifier.precision, purifier.num_steps) == (
        75, 10.0, "fp32", 2)
    assert config.attacks[2].surrogate == {"target": "straight-through"}


SECTIONS = {"attack": "attacks", "defence": "defenses"}
BAD_SETTINGS = [
    ("attack", "aa", {"norm": "Linf"}, ["'Linf'", "linf, l2"]),
    ("attack", "pgd", {"loss": "cw"}, ["'cw'", "ce, margin, dlr"]),
    ("attack", "pgd", {"eps": "8/2x5"}, ["'8/2x5'", "8/255"]),
    ("attack", "pgd", {"steps": "five"}, ["steps", "'five'"]),
    ("attack", "pgd", {"eot": 0}, ["eot=0"]),
    ("attack", "aa", {"version": "plus"}, ["'plus'", "standard, rand"]),
    ("attack", "aa", {"attacks_to_run": ["apgd-ce", "apgd_t"]}, ["'apgd_t'", "apgd-t"]),
    ("attack", "pgd", {"attacks_to_run": ["apgd-ce"]}, ["attacks_to_run", "'autoattack'"]),
    ("attack", "st", {"surrogate": {"target": "straight"}},
     ["surrogate", "'straight'", "hard, soft, straight-through"]),
    ("attack", "st", {"surrogate": {"num_step": 2}}, ["surrogate", "num_step", "num_steps"]),
    ("attack", "pgd", {"surrogate": {"num_steps": 2}}, ["'surrogate'", "'pgd'"]),
    ("defence", "purified", {"purifier": {"guidance": "victm"}}, ["'victm'", "none, victim, mse"]),
    ("defence", "purified", {"purifier": {"guidance": "victim+msee"}}, ["'msee'", "victim, mse"]),
    ("defence", "purified", {"purifier": {"target": "Soft"}}, ["'Soft'", "hard, soft, straight-through"]),
    ("defence", "purified", {"purifier": {"schedule": "linear"}},
     ["'linear'", "constant, linear-up, linear-down"]),
    ("defence", "purified", {"purifier": {"tstar": 50}}, ["tstar", "t_star"]),
    ("defence", "purified", {"purifier": {"t_star": "fifty"}}, ["t_star", "'fifty'"]),
    ("defence", "purified", {"purifier": {"precision": "half"}}, ["'half'", "bf16"]),
    ("defence", "jpeg", {"preprocessing": {"name": "jpg"}}, ["'jpg'", "bit-depth, jpeg, median"]),
    ("defence", "jpeg", {"preprocessing": {"name": "jpeg", "qualty": 75}}, ["qualty", "quality"]),
    ("defence", "jpeg", {"preprocessing": {"name": "jpeg", "quality": 300}}, ["300"]),
    ("defence", "none", {"purifier": {"t_star": 50}}, ["'purifier'", "'none'"]),
    ("defence", "none", {"kind": "classifier"}, ["needs 'classifier'"]),
    ("defence", "none", {"votes": 0}, ["votes", "0"]),
]


@pytest.mark.parametrize("noun, item, settings, expected", BAD_SETTINGS,
                         ids=[case_id(item, settings) for _, item, settings, _ in BAD_SETTINGS])
def test_a_bad_setting_fails_at_load_naming_its_item_value_and_choices(
        tmp_path: Path, noun: str, item: str, settings: dict, expected: list[str]) -> None:
    lists = {"defenses": DEFENSES, "attacks": ATTACKS}
    lists[SECTIONS[noun]] = with_setting(lists[SECTIONS[noun]], item, **settings)
    path = write_experiment(tmp_path / "bad.yaml", **lists)
    with pytest.raises(ValueError) as error:
        load_experiment(path)
    message = str(error.value)
    assert message.startswith(f"{path}: {noun} {item!r}: ")
    assert all(text in message for text in expected), message


@pytest.mark.parametrize("settings, expected", [
    ({"batch_size": "32"}, "ExperimentConfig.batch_size must be int, got '32'"),
    ({"data": {"limit": "ten"}}, "DataConfig.limit must be int | None, got 'ten'"),
    ({"seed": True}, "ExperimentConfig.seed must be int, got True"),
])
def test_a_setting_of_the_wrong_type_fails_at_load(tmp_path: Path, settings: dict, expected: str) -> None:
    with pytest.raises(ValueError, match=expected.replace("|", r"\|")):
        load_experiment(write_experiment(tmp_path / "bad.yaml", **settings))


def test_set_reaches_list_items_by_name(tmp_path: Path) -> None:
    path = write_experiment(tmp_path / "ok.yaml")
    config = load_experiment(path, parse_overrides([
        "attacks.pgd.eot=8", "attacks.st.surrogate.target=soft", "defenses.purified.purifier.t_star=50",
        "defenses.jpeg.preprocessing.quality=30"]))
    attacks = {attack.name: attack for attack in config.attacks}
    defenses = {defense.name: defense for defense in config.defenses}
    assert (attacks["pgd"].eot, attacks["pgd"].steps) == (8, 2)  # the rest of the item is kept
    assert attacks["st"].surrogate == {"target": "soft"} and attacks["aa"].eot is None
    assert defenses["purified"].purifier == {"guidance": "victim", "num_steps": 2, "t_star": 50}
    assert defenses["jpeg"].preprocessing == {"name": "jpeg", "quality": 30}
    assert [attack.name for attack in config.attacks] == [attack["name"] for attack in ATTACKS]


@pytest.mark.parametrize("text, value", [("2e-4", 2e-4), ("-1E3", -1000.0), (".5e+1", 5.0), ("1.0e-4", 1e-4),
                                         ("3", 3), ("0x1f", 31), ("1e", "1e"), ("e5", "e5"), ("v2e-4", "v2e-4")])
def test_exponent_floats_read_as_floats_in_files_and_overrides(tmp_path: Path, text: str, value) -> None:
    (tmp_path / "lr.yaml").write_text(f"learning_rate: {text}\n")
    from_file, from_override = load_yaml(tmp_path / "lr.yaml")["learning_rate"], parse_overrides([f"lr={text}"])["lr"]
    assert from_file == from_override == value and type(from_file) is type(value)
    (tmp_path / "round.yaml").write_text(dump_yaml({"as_string": text, "as_value": value}))
    assert load_yaml(tmp_path / "round.yaml") == {"as_string": text, "as_value": value}  # what a run stores


@pytest.mark.parametrize("pair, message", [
    ("attacks.pgd-eot.eot=8", "attacks has no item named 'pgd-eot'; known: clean, pgd, st, aa"),
    ("defenses.purified=3", r"defenses.purified is an item: set its settings"),
    ("defenses.purified.purifier.guidance=victm",
     "defence 'purified': purifier settings: unknown guidance 'victm'"),
])
def test_set_on_a_list_item_names_what_is_wrong(tmp_path: Path, pair: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_experiment(write_experiment(tmp_path / "ok.yaml"), parse_overrides([pair]))


def test_sde_step_must_be_a_fraction_of_continuous_time():
    from distpure.defenses.purifier import PurifierConfig

    for dt in (0.0, -1e-3, 5.0):
        with pytest.raises(ValueError, match="dt"):
            PurifierConfig(dt=dt)


def test_soft_temperature_must_be_positive():
    from distpure.defenses.purifier import PurifierConfig

    for temperature in (0.0, -0.5):
        with pytest.raises(ValueError, match="soft_temperature"):
            PurifierConfig(target="soft", soft_temperature=temperature)
    assert PurifierConfig(target="soft", soft_temperature=0.1).soft_temperature == 0.1
