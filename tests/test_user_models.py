"""Your own models as ``package.module:callable``: classifiers and diffusion models alike, with
errors that name the missing module or attribute and the wrong returned type."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from distpure.models.classifiers import load_classifier
from distpure.models.diffusion import DiffusionModel
from distpure.models.diffusion_loader import load_diffusion
from distpure.models.weights import save_state_dict
from distpure.registry import is_callable_spec

MODULE = "distpure_test_user_models"
SOURCE = '''
from torch import nn

from distpure.models.diffusion import DiffusionModel, default_scheduler, small_unet


def build_classifier(classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, classes))


def build_diffusion():
    return DiffusionModel(small_unet(sample_size=16, channels=(32, 32)), default_scheduler())


def build_dict():
    return {"not": "a module"}


NOT_CALLABLE = 3
'''


@pytest.fixture(scope="module", autouse=True)
def user_module(tmp_path_factory: pytest.TempPathFactory) -> None:
    """``MODULE`` written to a folder on sys.path for this module's tests."""
    folder = tmp_path_factory.mktemp("user")
    (folder / f"{MODULE}.py").write_text(SOURCE)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        yield
    sys.modules.pop(MODULE, None)


def test_callable_classifier_is_built_with_options_and_frozen() -> None:
    model = load_classifier(f"{MODULE}:build_classifier", classes=4)
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 4)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_callable_architecture_takes_local_weights(tmp_path: Path) -> None:
    import distpure_test_user_models as user

    torch.manual_seed(0)
    original = user.build_classifier()
    save_state_dict(original, tmp_path / "weights.safetensors")
    loaded = load_classifier(tmp_path / "weights.safetensors", arch=f"{MODULE}:build_classifier")
    images = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(loaded(images), original(images).detach())


def test_callable_diffusion_model() -> None:
    model = load_diffusion(f"{MODULE}:build_diffusion")
    assert isinstance(model, DiffusionModel) and model.sample_size == 16


@pytest.mark.parametrize("spec, error, message", [
    ("no_such_module_xyz:build", ImportError, "cannot import module 'no_such_module_xyz'"),
    (f"{MODULE}:build_missing", ImportError, "has no attribute 'build_missing'"),
    (f"{MODULE}:NOT_CALLABLE", TypeError, "'NOT_CALLABLE' is not callable \\(a int\\)"),
    (f"{MODULE}:build_dict", TypeError, "returned a builtins.dict; expected a torch.nn.*Module"),
])
def test_bad_callable_classifiers_are_named(spec: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        load_classifier(spec)


def test_callable_diffusion_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(TypeError, match="returned a torch.*Sequential; expected a .*NoisePredictor"):
        load_diffusion(f"{MODULE}:build_classifier")


@pytest.mark.parametrize("name, expected", [
    ("pkg.models:build", True), ("pkg:Factory.create", True), ("cifar10-resnet18", False),
    ("/models/x.pt", False), ("C:\\models\\x.pt", False), ("owner/name", False),
    ("a:b:c", False), ("1pkg:build", False),
])
def test_callable_specs_are_told_apart_from_names_and_paths(name: str, expected: bool) -> None:
    assert is_callable_spec(name) is expected
