"""Classifier zoo: torchvision, timm, RobustBench and your own models load with no network."""
from __future__ import annotations

import os
import sys
import urllib.error
from functools import cache
from pathlib import Path
from typing import Callable, Sequence

import gdown
import pytest
import torch
import torchvision
from torch import nn

from distpure.config import from_dict
from distpure.data import default_data_root, list_class_folder
from distpure.evaluation.config import ExperimentConfig
from distpure.evaluation.runner import build_defenses
from distpure.models.classifiers import IMAGENET_MEAN, IMAGENET_STD, load_classifier
from distpure.models.imagenet30 import IMAGENET30_CLASSES, imagenet30_classifier, imagenet30_indices
from distpure.models.robustbench_zoo import import_robustbench
from distpure.models.weights import save_state_dict

SavedModel = tuple[nn.Module, Path]


def _randomized(network: nn.Module) -> nn.Module:
    """``network`` in eval mode with random batch-norm statistics, so loading them is checked too."""
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    return network.eval()


def _normalized(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``images`` standardised per channel."""
    return (images - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def _assert_matches(loaded: nn.Module, original: nn.Module, images: torch.Tensor,
                    reference_inputs: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``loaded(images)`` has ``num_classes`` logits equal to ``original(reference_inputs)``."""
    with torch.no_grad():
        outputs, expected = loaded(images), original(reference_inputs)
    assert outputs.shape == (images.shape[0], num_classes)
    torch.testing.assert_close(outputs, expected)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    return expected


@pytest.fixture(scope="module")
def saved_torchvision(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], SavedModel]:
    """Saves (once per model name) a randomly initialised torchvision model as safetensors."""
    @cache
    def save(model_name: str) -> SavedModel:
        torch.manual_seed(0)
        network = _randomized(torchvision.models.get_model(model_name))
        path = tmp_path_factory.mktemp(model_name) / "weights.safetensors"
        save_state_dict(network, path)
        return network, path
    return save


@pytest.mark.parametrize("arch, model_name", [("imagenet-resnet50", "resnet50"),
                                              ("imagenet-wide-resnet50-2", "wide_resnet50_2")])
def test_torchvision_imagenet_model_loads_local_safetensors(
        saved_torchvision: Callable[[str], SavedModel], arch: str, model_name: str) -> None:
    original, path = saved_torchvision(model_name)
    images = torch.rand(1, 3, 64, 64)
    _assert_matches(load_classifier(path, arch=arch), original, images,
                    _normalized(images, IMAGENET_MEAN, IMAGENET_STD), 1000)


def test_imagenet30_resnet50_keeps_the_30_logits_in_label_order(
        saved_torchvision: Callable[[str], SavedModel]) -> None:
    original, path = saved_torchvision("resnet50")
    images = torch.rand(1, 3, 64, 64)
    full = _normalized(images, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        expected = original(full)[:, imagenet30_indices()]
        outputs = load_classifier("imagenet30-resnet50", weights=path, num_classes=30)(images)
    torch.testing.assert_close(outputs, expected)


def test_missing_pretrained_download_asks_for_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> nn.Module:
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(RuntimeError, match="local weights file"):
        load_classifier("imagenet-resnet50")


def test_timm_model_loads_local_checkpoint(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    original = _randomized(timm.create_model("resnet18", pretrained=False))
    path = tmp_path / "resnet18.pth"
    torch.save(original.state_dict(), path)
    images = torch.rand(1, 3, 64, 64)
    reference = _normalized(images, original.pretrained_cfg["mean"], original.pretrained_cfg["std"])
    _assert_matches(load_classifier(path, arch="timm:resnet18"), original, images, reference, 1000)
    _assert_matches(load_classifier("timm:resnet18", weights=path), original, images, reference, 1000)


def test_timm_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match="pip install timm"):
        load_classifier("timm:resnet18", weights=tmp_path / "unused.pth")


def _offline(*args: object, **kwargs: object) -> None:
    raise ConnectionError("no network")


@pytest.fixture(scope="module")
def robustbench_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """RobustBench's CIFAR-10 L-inf "Standard" WRN-28-10, random, saved as its zoo checkpoint
    (``{"state_dict": {"module.<key>": ...}}``) in RobustBench's model-directory layout."""
    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    torch.manual_seed(0)
    original = _randomized(model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]["Standard"]["model"]())
    model_dir = tmp_path_factory.mktemp("robustbench")
    path = model_dir / "cifar10" / "Linf" / "Standard.pt"
    path.parent.mkdir(parents=True)
    state = {f"module.{key}": value for key, value in original.state_dict().items()}
    torch.save({"state_dict": state}, path)
    return original, model_dir


def test_robustbench_zoo_model_loads_offline_from_a_local_model_dir(
        robustbench_dir: tuple[nn.Module, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    original, model_dir = robustbench_dir
    monkeypatch.setattr(gdown, "download", _offline)
    images = torch.rand(2, 3, 32, 32)  # RobustBench models take [0, 1] images: no normalisation
    loaded = load_classifier("robustbench:Standard", dataset="cifar10", threat_model="Linf",
                             model_dir=model_dir)
    _assert_matches(loaded, original, images, images, 10)


def test_configs_name_robustbench_victims_and_baselines(
        robustbench_dir: tuple[nn.Module, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    original, model_dir = robustbench_dir
    monkeypatch.setattr(gdown, "download", _offline)
    options = {"dataset": "cifar10", "threat_model": "Linf", "model_dir": str(model_dir)}
    config = from_dict(ExperimentConfig, {
        "models": {"victim": "robustbench:Standard", "victim_options": options},
        "defenses": [{"name": "none", "kind": "none"},
                     {"name": "at", "kind": "classifier", "classifier": "robustbench:Standard",
                      "classifier_options": options}],
        "attacks": [{"name": "clean", "kind": "clean"}]})
    defenses = build_defenses(config, torch.device("cpu"))
    images = torch.rand(2, 3, 32, 32)
    for defense in defenses.values():
        _assert_matches(defense.victim, original, images, images, 10)


def test_robustbench_missing_checkpoint_offline_asks_for_a_local_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gdown, "download", _offline)
    with pytest.raises(FileNotFoundError, match=r"Standard\.pt is missing.*pass a local directory"):
        load_classifier("robustbench:Standard", model_dir=tmp_path)


@pytest.mark.parametrize("options, error, message", [
    ({"threat_model": "Linf"}, KeyError, "unknown RobustBench model 'NoSuchModel'.*Standard"),
    ({"threat_model": "L3"}, ValueError, "threat model 'L3'; choices: Linf, L2"),
    ({"dataset": "mnist"}, ValueError, "dataset 'mnist'; choices: cifar10, cifar100, imagenet"),
])
def test_robustbench_bad_names_list_the_choices(options: dict, error: type[Exception],
                                                message: str) -> None:
    with pytest.raises(error, match=message):
        load_classifier("robustbench:NoSuchModel", **options)


def test_imagenet30_indices_name_the_torchvision_categories() -> None:
    categories = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    indices = imagenet30_indices()
    assert len(IMAGENET30_CLASSES) == 30 and len(set(indices)) == 30
    for folder, (_, index) in IMAGENET30_CLASSES.items():
        assert categories[index].lower() in folder.replace("_", " "), (folder, categories[index])


def test_imagenet30_wnids_are_at_their_sorted_imagenet_positions() -> None:
    timm_data = pytest.importorskip("timm.data")
    wnids = timm_data.ImageNetInfo().label_names()
    assert wnids == sorted(wnids)
    for folder, (wnid, index) in IMAGENET30_CLASSES.items():
        assert wnids[index] == wnid, folder


def test_imagenet30_classifier_selects_logits_in_folder_order() -> None:
    logits = torch.randn(2, 1000)
    expected = torch.stack([logits[:, IMAGENET30_CLASSES[name][1]]
                            for name in sorted(IMAGENET30_CLASSES)], dim=1)
    torch.testing.assert_close(imagenet30_classifier(nn.Identity())(logits), expected)


def _imagenet30_root() -> Path:
    """The ImageNet-30 sample folders; skips when absent unless DISTPURE_REQUIRE_DATA=1."""
    root = default_data_root() / "imagenet30-samples"
    if not root.is_dir():
        if os.environ.get("DISTPURE_REQUIRE_DATA") == "1":
            pytest.fail(f"{root} is missing and DISTPURE_REQUIRE_DATA=1")
        pytest.skip(f"{root} is missing (set DISTPURE_DATA to the shared data folder)")
    return root


def test_imagenet30_mapping_matches_the_data_folders() -> None:
    items, classes = list_class_folder(_imagenet30_root())
    assert classes == tuple(sorted(IMAGENET30_CLASSES))
    for path, label in items:
        assert path.stem.split("_")[0] == IMAGENET30_CLASSES[classes[label]][0], path
