"""guided-diffusion (ADM) checkpoints: flags -> UNet2DModel config, key conversion, conformance vectors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from distpure.cli.main import main
from distpure.models.adm import (ADM_256_UNCOND_FLAGS, adm_unet_config, convert_adm,
                                 convert_adm_state_dict, load_adm_checkpoint)
from distpure.models.diffusion import DiffusionModel
from distpure.models.diffusion_loader import load_diffusion
from distpure.sampling.reverse import learned_log_variance, posterior_mean, predict_x0, step_coefficients

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "adm"
TOLERANCE = 1e-4


def fixture(name: str) -> Path:
    """A file of the shared ADM fixtures; skip (or fail with DISTPURE_REQUIRE_DATA=1) if absent."""
    path = FIXTURES / name
    if not path.is_file():
        if os.environ.get("DISTPURE_REQUIRE_DATA") == "1":
            pytest.fail(f"ADM fixture {path} is missing and DISTPURE_REQUIRE_DATA=1")
        pytest.skip(f"ADM fixture {path} is not available")
    return path


@pytest.fixture(scope="module")
def spec() -> dict:
    return json.loads(fixture("adm256_uncond_state_dict_spec.json").read_text())


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in np.load(fixture("adm_tiny_256_io.npz")).items()}


@pytest.fixture(scope="module")
def tiny() -> DiffusionModel:
    fixture("adm_tiny_256_config.json")
    return load_adm_checkpoint(fixture("adm_tiny_256.safetensors"))


def tiny_flags() -> dict:
    return json.loads(fixture("adm_tiny_256_config.json").read_text())["flags"]


def meta_state_dict(spec: dict) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in spec["state_dict"].items()}


def test_256_uncond_flags_constant_matches_spec(spec: dict) -> None:
    assert spec["flags"] == ADM_256_UNCOND_FLAGS


def test_256_uncond_spec_converts_completely(spec: dict) -> None:
    with torch.device("meta"):
        unet = UNet2DModel(**adm_unet_config(spec["flags"]))
    assert sum(p.numel() for p in unet.parameters()) == spec["num_params"] == 552_814_086
    state = meta_state_dict(spec)
    assert len(state) == 566
    converted = convert_adm_state_dict(state, spec["flags"])
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert sum(v.numel() for v in converted.values()) == 552_814_086


def test_conversion_names_unmapped_and_unfilled_keys(spec: dict) -> None:
    state = meta_state_dict(spec)
    with pytest.raises(ValueError, match="label_emb.weight"):
        convert_adm_state_dict({**state, "label_emb.weight": torch.empty(1000, 1024, device="meta")},
                               spec["flags"])
    del state["out.2.bias"]
    with pytest.raises(ValueError, match="conv_out.bias"):
        convert_adm_state_dict(state, spec["flags"])


@pytest.mark.parametrize("override, message", [
    ({"class_cond": True}, "class_cond"),
    ({"channel_mult": "", "image_size": 512}, "channel_mult"),
    ({"num_head_channels": -1}, "head width"),
    ({"noise_schedule": "cosine"}, "noise_schedule"),
    ({"not_a_flag": 1}, "not_a_flag"),
])
def test_unrepresentable_flags_raise(override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        adm_unet_config({**ADM_256_UNCOND_FLAGS, **override})


def test_tiny_model_output(tiny: DiffusionModel, io: dict[str, torch.Tensor]) -> None:
    assert tiny.learned_variance and sum(p.numel() for p in tiny.parameters()) == 6_117_510
    with torch.no_grad():
        output = tiny(io["x"], io["t"])
    error = (output - io["model_output"]).abs().max().item()
    print(f"model_output max abs error {error:.3g}")
    assert error < TOLERANCE


def test_learned_variance_step(tiny: DiffusionModel, io: dict[str, torch.Tensor]) -> None:
    """The purifier's reverse-step maths reproduces guided-diffusion's p_mean_variance."""
    for i, t in enumerate(io["t"].tolist()):
        c = step_coefficients(tiny.alphas_cumprod, t, t - 1)
        eps, variance = io["model_output"][i : i + 1].chunk(2, dim=1)
        x_t = io["x"][i : i + 1]
        x0 = predict_x0(x_t, eps, c.alpha_bar)
        computed = {"pred_xstart": x0, "p_mean": posterior_mean(x_t, x0, c),
                    "p_log_variance": learned_log_variance(variance, c)}
        for name, value in computed.items():
            error = (value - io[name][i : i + 1]).abs().max().item()
            print(f"t={t} {name} max abs error {error:.3g}")
            assert error < TOLERANCE, name


def assert_same_model(model: DiffusionModel, reference: DiffusionModel) -> None:
    state, expected = model.unet.state_dict(), reference.unet.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert model.scheduler.config.variance_type == "learned_range"
    assert model.scheduler.config.clip_sample
    assert torch.allclose(model.alphas_cumprod, reference.alphas_cumprod)


@pytest.fixture
def tiny_pt(tmp_path: Path) -> Path:
    """The tiny fixture as a guided-diffusion ``.pt`` state dict with its config beside it."""
    path = tmp_path / "adm_tiny.pt"
    torch.save(load_file(fixture("adm_tiny_256.safetensors")), path)
    (tmp_path / "config.json").write_text(json.dumps({"flags": tiny_flags()}))
    return path


def test_load_diffusion_reads_pt(tiny_pt: Path, tiny: DiffusionModel) -> None:
    model = load_diffusion(tiny_pt)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_same_model(model, tiny)


def test_convert_adm_round_trip(tiny_pt: Path, tiny: DiffusionModel, tmp_path: Path) -> None:
    out = convert_adm(tiny_pt, tmp_path / "diffusers")
    assert (out / "scheduler_config.json").is_file()
    assert_same_model(DiffusionModel.from_pretrained(out), tiny)


def test_convert_adm_cli(tiny_pt: Path, tiny: DiffusionModel, tmp_path: Path) -> None:
    flags_json = tmp_path / "flags.json"
    flags_json.write_text(json.dumps(tiny_flags()))
    (tmp_path / "config.json").unlink()
    assert main(["convert-adm", str(tiny_pt), str(tmp_path / "cli"), "--config", str(flags_json)]) == 0
    assert_same_model(DiffusionModel.from_pretrained(tmp_path / "cli"), tiny)


def test_checkpoint_with_other_flags_says_how_to_pass_them(tmp_path: Path, capsys) -> None:
    """With no config beside it, the tiny model meets the 256x256 model's flags: the error says
    its flags differ and how to pass them (not the ~50 unmatched keys), and doing so works."""
    checkpoint = tmp_path / "adm_tiny.safetensors"
    checkpoint.write_bytes(fixture("adm_tiny_256.safetensors").read_bytes())
    assert main(["convert-adm", str(checkpoint), str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "256x256 unconditional model's flags" in message and "its flags differ" in message
    assert "num_channels=32 where they say 256" in message and "input_blocks" not in message
    assert "--config FLAGS.json" in message and str(tmp_path / "adm_tiny_config.json") in message
    (tmp_path / "adm_tiny_config.json").write_text(json.dumps({"flags": tiny_flags()}))
    assert main(["convert-adm", str(checkpoint), str(tmp_path / "out")]) == 0


def test_wrong_flags_given_are_named_as_such(tiny_pt: Path) -> None:
    with pytest.raises(ValueError, match="does not match the flags given: its flags differ"):
        load_adm_checkpoint(tiny_pt, {**tiny_flags(), "num_res_blocks": 2})
