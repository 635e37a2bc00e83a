"""Loading diffusion models (local diffusers directories, hub ids, fp16 round trips) and classifiers,
and refusing unsafe pickled checkpoints."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from distpure.models.classifiers import load_classifier
from distpure.models.diffusion import DiffusionModel
from distpure.models.diffusion_loader import load_diffusion
from distpure.models.weights import UnsafeCheckpointError, load_state_dict
from distpure.sampling.reverse import predict_x0


# --- a local diffusers directory (the google/ddpm-cifar10-32 layout) -----------------------------


@pytest.fixture(scope="module")
def ddpm_cifar10_dir(tmp_path_factory, require_shared) -> Path:
    """A randomly initialised model built from the public DDPM CIFAR-10 configs, saved locally."""
    fixture = require_shared("fixtures/ddpm-cifar10-32")
    config = json.loads((fixture / "config.json").read_text())
    torch.manual_seed(0)
    unet = UNet2DModel.from_config(config)
    scheduler = DDPMScheduler.from_pretrained(fixture)
    directory = tmp_path_factory.mktemp("ddpm-cifar10-32")
    unet.save_pretrained(directory, safe_serialization=True)
    scheduler.save_pretrained(directory)
    return directory


def test_load_local_diffusers_directory(ddpm_cifar10_dir: Path) -> None:
    assert (ddpm_cifar10_dir / "diffusion_pytorch_model.safetensors").is_file()
    model = load_diffusion(ddpm_cifar10_dir)
    assert isinstance(model, DiffusionModel)
    parameters = sum(p.numel() for p in model.parameters())
    assert abs(parameters - 35.7e6) < 0.1e6, parameters
    assert not model.unet.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert (model.num_train_timesteps, model.image_channels, model.sample_size) == (1000, 3, 32)
    assert not model.learned_variance
    # the linear schedule of Ho et al., as float64 cumulative products
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(model.alphas_cumprod, torch.cumprod(1.0 - betas, 0), rtol=1e-6, atol=1e-9)
    assert model.scheduler.config.variance_type == "fixed_large"
    assert model.scheduler.config.clip_sample is True
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.predict_noise(x, torch.tensor([100]))
    assert out.shape == (1, 3, 32, 32)
    assert torch.isfinite(out).all()


def test_load_diffusers_subfolder_layout(tmp_path: Path, tiny_diffusion: DiffusionModel) -> None:
    """A pipeline layout (``unet/`` and ``scheduler/`` sub-folders) loads too."""
    tiny = tiny_diffusion
    tiny.unet.save_pretrained(tmp_path / "unet")
    tiny.scheduler.save_pretrained(tmp_path / "scheduler")
    loaded = load_diffusion(tmp_path)
    for key, value in tiny.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[key], value), key


def test_load_existing_non_model_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="expected a diffusers directory or a guided-diffusion"):
        load_diffusion(path)


# --- names that are not local -------------------------------------------------------------------


def test_unreachable_hub_id_asks_for_a_local_path(monkeypatch) -> None:
    import huggingface_hub

    calls = []

    def offline(repo_id, **kwargs):
        calls.append(repo_id)
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="pass the local directory") as error:
        load_diffusion("someone/some-model")
    assert calls == ["someone/some-model"]
    assert "someone/some-model" in str(error.value)
    assert "OSError" in str(error.value)


def test_unknown_name_is_a_clear_error(monkeypatch) -> None:
    import huggingface_hub

    def never(*args, **kwargs):
        raise AssertionError("a name that is not a hub id must not reach the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", never)
    for name in ("no-such-model", "a/b/c", "./missing/dir"):
        with pytest.raises(FileNotFoundError, match="neither a registered model") as error:
            load_diffusion(name)
        assert "cifar10-ddpm-small" in str(error.value)  # lists the registered names


# --- fp16 save / load round trip ---------------------------------------------------------------


def test_fp16_save_round_trip(tmp_path: Path, tiny_diffusion: DiffusionModel) -> None:
    model = tiny_diffusion
    originals = {k: v.clone() for k, v in model.unet.state_dict().items()}
    model.save_pretrained(tmp_path, dtype=torch.float16)
    # saving a half-precision copy leaves the model itself untouched
    assert all(p.dtype == torch.float32 for p in model.parameters())
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in stored.values() if v.is_floating_point())
    assert (tmp_path / "scheduler_config.json").is_file()
    loaded = DiffusionModel.from_pretrained(tmp_path)
    state = loaded.unet.state_dict()
    assert state.keys() == originals.keys()
    for key, value in originals.items():
        assert state[key].dtype == torch.float32, key
        assert torch.equal(state[key], value.half().float()), key
    torch.testing.assert_close(loaded.alphas_cumprod, model.alphas_cumprod, rtol=0, atol=0)
    assert loaded.scheduler.config.variance_type == model.scheduler.config.variance_type


# --- classifiers and safe weight loading ------------------------------------------------------


def test_load_default_cifar10_classifier() -> None:
    model = load_classifier("cifar10-resnet18")
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    load_classifier("cifar10-resnet18", num_classes=10)  # the class-count check passes
    with pytest.raises(ValueError, match="has 10 outputs but the data has 30 classes"):
        load_classifier("cifar10-resnet18", num_classes=30)


def test_unknown_classifier_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="unknown classifier 'no-such-net'"):
        load_classifier("no-such-net")


class _Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Payload(f"touch {marker}")}, path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="refused to load") as error:
        load_state_dict(path)
    assert str(path) in str(error.value)
    assert not marker.exists()


def test_plain_state_dict_checkpoints_load(tmp_path: Path) -> None:
    """The safe path still reads ordinary (wrapped, DataParallel-prefixed) checkpoints."""
    state = {"module.layer.weight": torch.randn(3, 2), "module.layer.bias": torch.randn(3)}
    path = tmp_path / "ok.pt"
    torch.save({"state_dict": state}, path)
    loaded = load_state_dict(path)
    assert loaded.keys() == {"layer.weight", "layer.bias"}
    assert torch.equal(loaded["layer.weight"], state["module.layer.weight"])


# --- what the UNet predicts: ε, v or x0 ---------------------------------------------------------


def _predicting(diffusion: DiffusionModel, prediction_type: str) -> DiffusionModel:
    """``diffusion``'s UNet read as predicting ``prediction_type`` (unclipped, like the tests' x̂0)."""
    scheduler = DDPMScheduler.from_config(diffusion.scheduler.config, prediction_type=prediction_type,
                                          clip_sample=False)
    return DiffusionModel(diffusion.unet, scheduler)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_v_and_x0_predictions_become_the_epsilon_diffusers_implies(
        tiny_diffusion: DiffusionModel, prediction_type: str) -> None:
    """x̂0 from the converted ε equals the ``pred_original_sample`` of diffusers' DDPM step."""
    model = _predicting(tiny_diffusion, prediction_type)
    x_t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    with torch.no_grad():
        eps, raw = model(x_t, t), model.unet(x_t, t).sample
        assert not torch.allclose(eps, raw, atol=0.1)
        for i, step in enumerate(t.tolist()):
            expected = model.scheduler.step(raw[i:i + 1], step, x_t[i:i + 1]).pred_original_sample
            x0 = predict_x0(x_t[i:i + 1], eps[i:i + 1], model.alphas_cumprod[step].float(), clip=False)
            torch.testing.assert_close(x0, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="integer timesteps"):
        model(x_t, t + 0.5)


def test_unknown_prediction_type_is_refused(tiny_diffusion: DiffusionModel) -> None:
    with pytest.raises(ValueError, match="prediction_type 'score'.*epsilon, v_prediction, sample"):
        _predicting(tiny_diffusion, "score")


def test_eta_with_a_learned_variance_model_is_refused(tiny_images: torch.Tensor) -> None:
    """A learned-variance step uses the model's variance, so a DDIM η would be silently ignored."""
    from distpure.defenses.purifier import Purifier, PurifierConfig
    from distpure.models.diffusion import default_scheduler

    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=6, block_out_channels=(32, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, add_attention=False)
    model = DiffusionModel(unet, default_scheduler())
    assert model.learned_variance
    config = PurifierConfig(t_star=20, num_steps=2, guidance="none", precision="fp32")
    assert Purifier(model, config)(tiny_images).shape == tiny_images.shape
    with pytest.raises(ValueError, match="eta=0.0: a learned-variance model"):
        Purifier(model, PurifierConfig(**{**vars(config), "eta": 0.0}))(tiny_images)
