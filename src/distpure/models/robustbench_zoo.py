"""RobustBench zoo models through the ``robustbench`` package (``pip install 'distpure[robustbench]'``).

Every zoo model takes [0, 1] images: RobustBench puts any input normalisation inside the model
(``DMWideResNet``'s mean and std, ``normalize_model`` for ImageNet), so none is added here.
Checkpoints live in RobustBench's layout, ``<model_dir>/<dataset>/<threat_model>/<name>.pt``.
"""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from types import ModuleType

import torch
from torch import nn


def default_model_dir() -> Path:
    """Where zoo checkpoints are looked for and downloaded to: ``<torch hub dir>/robustbench``."""
    return Path(torch.hub.get_dir()) / "robustbench"


def import_robustbench() -> ModuleType:
    """The ``robustbench`` package. Its 1.1.1 release imports AutoAttack as ``autoattack`` (the
    name of AutoAttack's GitHub install) while the PyPI ``pyautoattack`` it depends on installs
    it as ``pyautoattack``; that module is aliased when ``autoattack`` is absent."""
    try:
        import autoattack  # noqa: F401
    except ImportError:
        import pyautoattack
        import pyautoattack.state

        sys.modules["autoattack"] = pyautoattack
        sys.modules["autoattack.state"] = pyautoattack.state
    try:
        import robustbench
    except ImportError as error:
        raise ImportError(f"robustbench: models need the robustbench package ({error}): "
                          "pip install 'distpure[robustbench]'") from error
    return robustbench


def _member(enum: type[Enum], value: str, what: str) -> Enum:
    """``enum(value)``, or an error naming the choices."""
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(str(member.value) for member in enum)
        raise ValueError(f"unknown RobustBench {what} {value!r}; choices: {choices}") from None


def _checkpoints(model_path: Path, gdrive_id: str | list[str] | None) -> list[Path]:
    """The files RobustBench reads for a model: ``<name>.pt``, or ``<name>.pt_m<i>.pt`` per
    member of an ensemble."""
    if isinstance(gdrive_id, list):
        return [Path(f"{model_path}_m{i}.pt") for i in range(len(gdrive_id))]
    return [model_path]


def robustbench_classifier(model_name: str, weights: str | Path | None = None,
                           dataset: str = "cifar10", threat_model: str = "Linf",
                           model_dir: str | Path | None = None) -> nn.Module:
    """The RobustBench zoo model ``model_name`` of ``dataset`` and ``threat_model``, from
    ``model_dir`` (RobustBench's layout; downloaded there first when missing and online)."""
    if weights is not None:
        raise ValueError(f"robustbench:{model_name} reads its checkpoint from model_dir "
                         f"(<model_dir>/{dataset}/{threat_model}/{model_name}.pt), not weights=")
    robustbench = import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    zoo = model_dicts[_member(BenchmarkDataset, dataset, "dataset")][
        _member(ThreatModel, threat_model, "threat model")]
    if model_name not in zoo:
        raise KeyError(f"unknown RobustBench model {model_name!r} for {dataset} {threat_model}; "
                       f"known: {', '.join(zoo)}")
    directory = Path(model_dir).expanduser() if model_dir is not None else default_model_dir()
    model_path = directory / dataset / threat_model / f"{model_name}.pt"
    missing = [path for path in _checkpoints(model_path, zoo[model_name]["gdrive_id"])
               if not path.is_file()]
    try:
        return robustbench.load_model(model_name, model_dir=directory, dataset=dataset,
                                      threat_model=threat_model)
    except Exception as error:  # downloads fail in many ways (network, quota, HTML pages)
        if not missing:
            raise
        raise FileNotFoundError(
            f"robustbench:{model_name}: {', '.join(map(str, missing))} is missing and could not be "
            f"downloaded ({type(error).__name__}: {error}). Offline, copy the checkpoint there or "
            f"pass a local directory in RobustBench's layout: model_dir=<dir holding "
            f"{dataset}/{threat_model}/{model_name}.pt>") from error
