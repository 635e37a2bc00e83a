"""Score-SDE NCSN++ and DiffPure's reverse-SDE sampler against ../shared/fixtures/score-sde:
the full-size spec's keys and shapes, the tiny checkpoint's output and score, one Euler-Maruyama
step, the loaders and ``convert-score-sde``, the SDE purifier's gradients, and an end-to-end run
of configs/cifar10-diffpure-original.yaml on the tiny model."""
from __future__ import annotations

import copy
import itertools
import json
import math
import shutil
from dataclasses import astuple
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMScheduler
from safetensors.torch import load_file
from torch import nn

from test_purifier import fixed_noise, make_purifier, weights_for

from distpure.cli.main import main
from distpure.config import load_yaml
from distpure.defenses.purifier import Purifier
from distpure.evaluation.records import read_records
from distpure.models.classifiers import load_classifier
from distpure.models.diffusion import DiffusionModel
from distpure.models.diffusion_loader import load_diffusion
from distpure.models.noise_predictor import NoisePredictor
from distpure.models.ncsnpp import (NCSNpp, NCSNppConfig, ScoreSDEModel, convert_score_sde,
                                    convert_score_sde_state_dict, load_score_sde, ncsnpp_config)
from distpure.models.weights import save_state_dict
from distpure.sampling.sde import T_END, VPSDE, reverse_drift, reverse_sde_step, reverse_sde_times

FIXTURES = "fixtures/score-sde"
TOLERANCE = 1e-5
FULL_PARAMETERS = 106_632_579
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cifar10-diffpure-original.yaml"
LIMIT = 4


@pytest.fixture(scope="module")
def shared_file(require_shared: Callable[[str], Path]) -> Callable[[str], Path]:
    """A file of the shared score-SDE fixtures (skips, or fails in CI, when absent)."""
    return lambda name: require_shared(f"{FIXTURES}/{name}")


@pytest.fixture(scope="module")
def spec(shared_file) -> dict:
    return json.loads(shared_file("ncsnpp_ddpmpp_deep_state_dict_spec.json").read_text())


@pytest.fixture(scope="module")
def io(shared_file) -> dict[str, torch.Tensor]:
    arrays = np.load(shared_file("ncsnpp_tiny_io.npz"))
    return {key: torch.from_numpy(value) for key, value in arrays.items()}


@pytest.fixture(scope="module")
def tiny(shared_file) -> ScoreSDEModel:
    """The tiny model from its score_sde training checkpoint (EMA weights) and its config."""
    return load_score_sde(shared_file("ncsnpp_tiny_checkpoint.pth"),
                          shared_file("ncsnpp_tiny_config.json"))


def assert_same_weights(model: ScoreSDEModel, reference: ScoreSDEModel) -> None:
    state, expected = model.network.state_dict(), reference.network.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in expected)
    assert model.config == reference.config


# --- the network ----------------------------------------------------------------------------------


def test_default_config_is_the_spec_model(spec: dict) -> None:
    assert ncsnpp_config(spec["model_config"]) == NCSNppConfig()


def test_full_spec_converts_to_every_key_and_shape(spec: dict) -> None:
    """All 957 tensors of checkpoint_8.pth's model map onto the network built on the meta device."""
    assert len(spec["state_dict"]) == 957
    with torch.device("meta"):
        network = NCSNpp(NCSNppConfig())
    state = {key: torch.empty(shape, device="meta") for key, shape in spec["state_dict"].items()}
    converted = convert_score_sde_state_dict(state, network)
    expected = {key: tuple(value.shape) for key, value in network.state_dict().items()}
    assert {key: tuple(value.shape) for key, value in converted.items()} == expected
    assert len(converted) == 956  # every entry but the unused ``sigmas`` buffer
    assert sum(p.numel() for p in network.parameters()) == spec["parameters"] == FULL_PARAMETERS


def test_conversion_refuses_unknown_keys(spec: dict) -> None:
    with torch.device("meta"):
        network = NCSNpp(NCSNppConfig())
    state = {key: torch.empty(shape, device="meta") for key, shape in spec["state_dict"].items()}
    extra = {**state, "all_modules.3.NIN_9.W": torch.empty(1, device="meta"),
             "all_modules.999.weight": torch.empty(1, device="meta")}
    unmapped = r"2 score_sde keys .*: all_modules\.3\.NIN_9\.W, all_modules\.999\.weight$"
    with pytest.raises(ValueError, match=unmapped):
        convert_score_sde_state_dict(extra, network)


@pytest.mark.parametrize("override, message", [
    ({"fir": True}, "fir=True"),
    ({"progressive": "output_skip"}, "progressive='output_skip'"),
    ({"embedding_type": "fourier"}, "embedding_type"),
    ({"scale_by_sigma": True}, "scale_by_sigma"),
    ({"not_a_setting": 1}, "not_a_setting"),
])
def test_unsupported_settings_are_refused(spec: dict, override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ncsnpp_config({**spec["model_config"], **override})


def test_tiny_model_output_and_score(tiny: ScoreSDEModel, io: dict[str, torch.Tensor]) -> None:
    """The network called with labels 999 t reproduces score_sde's output; -ε / std(t) its score."""
    assert sum(p.numel() for p in tiny.parameters()) == 2_474_787
    torch.testing.assert_close(io["labels"], 999 * io["t"])
    with torch.no_grad():
        output = tiny(io["x"], 999 * io["t"])
    error = (output - io["model_output"]).abs().max().item()
    print(f"model_output max abs error {error:.3g} (outputs up to {io['model_output'].abs().max():.3g})")
    assert error < TOLERANCE
    for i, t in enumerate(io["t"].tolist()):
        score = -output[i] / tiny.sde.std(t)
        score_error = ((score - io["score"][i]).abs().max() / io["score"][i].abs().max()).item()
        print(f"t={t:.2f} score max relative error {score_error:.3g}")
        assert score_error < TOLERANCE


def test_tiny_model_runs_in_the_discrete_schedule(tiny: ScoreSDEModel) -> None:
    """The DDPM/DDIM samplers see DiffPure's discretisation β_i = linspace(0.1, 20, 1000)_i / 1000."""
    betas = torch.linspace(0.1 / 1000, 20 / 1000, 1000, dtype=torch.float64)
    torch.testing.assert_close(tiny.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-12, atol=0)
    assert tiny.num_train_timesteps == 1000 and tiny.sde == VPSDE(0.1, 20.0)
    assert (tiny.image_channels, tiny.sample_size, tiny.learned_variance) == (3, 32, False)
    assert astuple(VPSDE.from_betas(tiny.betas)) == pytest.approx(astuple(tiny.sde))


# --- loading --------------------------------------------------------------------------------------


def test_checkpoint_and_safetensors_give_the_ema_weights(tiny: ScoreSDEModel, shared_file) -> None:
    from_safetensors = load_score_sde(shared_file("ncsnpp_tiny_ema.safetensors"),
                                      json.loads(shared_file("ncsnpp_tiny_config.json").read_text()))
    assert_same_weights(from_safetensors, tiny)
    raw = torch.load(shared_file("ncsnpp_tiny_checkpoint.pth"), weights_only=True)["model"]
    conv_in = raw["module.all_modules.2.weight"]
    assert not torch.equal(tiny.network.conv_in.weight, conv_in)  # the EMA, not the raw weights


@pytest.mark.parametrize("name", ["ncsnpp_tiny_checkpoint.pth", "ncsnpp_tiny_ema.safetensors"])
def test_load_diffusion_finds_the_config_beside_the_file(tiny: ScoreSDEModel, shared_file,
                                                         tmp_path: Path, name: str) -> None:
    weights = tmp_path / f"tiny{Path(name).suffix}"
    weights.symlink_to(shared_file(name))
    shutil.copy(shared_file("ncsnpp_tiny_config.json"), tmp_path / "tiny_config.json")
    model = load_diffusion(weights)
    assert isinstance(model, ScoreSDEModel)
    assert_same_weights(model, tiny)


def test_bare_checkpoint_is_read_as_diffpures_model(shared_file, tmp_path: Path) -> None:
    """Without a config, a .pth is DDPM++ deep continuous: the tiny weights do not fit it."""
    (tmp_path / "checkpoint_8.pth").symlink_to(shared_file("ncsnpp_tiny_checkpoint.pth"))
    with pytest.raises(ValueError, match="do not fit the NCSN.. config.*nf=128"):
        load_diffusion(tmp_path / "checkpoint_8.pth")


def test_convert_cli_round_trip(tiny: ScoreSDEModel, shared_file, tmp_path: Path) -> None:
    out = tmp_path / "converted"
    assert main(["convert-score-sde", str(shared_file("ncsnpp_tiny_checkpoint.pth")), str(out),
                 "--config", str(shared_file("ncsnpp_tiny_config.json"))]) == 0
    assert json.loads((out / "config.json").read_text())["name"] == "ncsnpp"
    model = load_diffusion(out)
    assert isinstance(model, ScoreSDEModel)
    assert_same_weights(model, tiny)


def test_convert_writes_float16_on_request(tiny: ScoreSDEModel, tmp_path: Path) -> None:
    tiny.save_pretrained(tmp_path / "half", dtype=torch.float16)
    model = load_diffusion(tmp_path / "half")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(model.network.conv_in.weight, tiny.network.conv_in.weight,
                               rtol=1e-3, atol=1e-4)


def test_checkpoint_with_mismatched_ema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.pth"
    weights = {"module.sigmas": torch.ones(3), "module.a": torch.zeros(2), "module.b": torch.zeros(2)}
    torch.save({"model": weights, "ema": {"shadow_params": [torch.zeros(2)]}}, path)
    with pytest.raises(ValueError, match="1 EMA tensors for 2 model parameters"):
        convert_score_sde(path, tmp_path / "out")
    torch.save({"model": weights}, path)
    with pytest.raises(ValueError, match="not a score_sde checkpoint"):
        load_diffusion(path)


# --- the reverse SDE ------------------------------------------------------------------------------


def test_reverse_sde_step_matches_fixture(io: dict[str, torch.Tensor]) -> None:
    """Drift, diffusion and one Euler-Maruyama step x - drift dt + g dW, as torchsde takes it."""
    sde, dt = VPSDE(), float(io["dt"])
    for i, t in enumerate(io["t"].tolist()):
        x, score = io["x"][i], io["score"][i]
        assert math.sqrt(sde.beta(t)) == pytest.approx(float(io["diffusion"][i]), rel=1e-6)
        drift = reverse_drift(x, score, sde, t)
        x_prev = reverse_sde_step(x, score, sde, t, dt, io["dW"][i])
        for name, value in (("rev_drift", drift), ("x_prev", x_prev)):
            error = (value - io[name][i]).abs().max().item()
            print(f"t={t:.2f} {name} max abs error {error:.3g}")
            assert error < TOLERANCE, name
        assert (x_prev - x).abs().max() > 100 * TOLERANCE  # the step moves x: the check has teeth


def test_reverse_sde_times() -> None:
    times = reverse_sde_times(0.1, 1e-3)
    assert len(times) == 100 and times[0] == 0.1
    assert times[-1] == pytest.approx(1e-3) and times[-1] - T_END < 1e-3
    assert reverse_sde_times(0.05, 0.02) == pytest.approx([0.05, 0.03, 0.01])
    for dt in (0.0, -1e-3, 2.0):
        with pytest.raises(ValueError, match="dt must be"):
            reverse_sde_times(0.1, dt)


def test_sde_of_a_discrete_schedule() -> None:
    """DDPM's linear β (1e-4 to 0.02 over 1000 steps) is the VP-SDE with β from 0.1 to 20."""
    linear = DiffusionModel(torch.nn.Identity(), DDPMScheduler(beta_start=1e-4, beta_end=0.02))
    assert astuple(linear.sde) == pytest.approx((0.1, 20.0))
    cosine = DiffusionModel(torch.nn.Identity(), DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    with pytest.raises(ValueError, match="linear β schedule"):
        cosine.sde


# --- the SDE sampler in the purifier --------------------------------------------------------------


def make_sde_purifier(diffusion: NoisePredictor, victim: nn.Module | None = None,
                      **options) -> Purifier:
    """DiffPure's sampler from t* = 0.05 with dt = 0.02 (3 steps), fp32, unguided unless overridden."""
    return make_purifier(diffusion, victim, **{"sampler": "sde", "t_star": 0.05, "dt": 0.02, **options})


def test_sde_purifier_integrates_the_reverse_sde(tiny: ScoreSDEModel) -> None:
    """Forward diffusion with DiffPure's ᾱ of t* steps, then Euler-Maruyama steps at labels 999 t
    with score -ε / std(t) and dW = √dt z, the last step shortened to end at 1e-5."""
    purifier = make_sde_purifier(tiny)
    assert purifier.timesteps == pytest.approx([0.05, 0.03, 0.01])
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    noise = fixed_noise(purifier, images.shape)
    with torch.no_grad():
        purified = purifier(images, noise)
        alpha_bar = tiny.alphas_cumprod[49]
        x = alpha_bar.sqrt() * (2 * images - 1) + (1 - alpha_bar).sqrt() * noise.forward
        for step, (t, t_next) in enumerate(zip([0.05, 0.03, 0.01], [0.03, 0.01, T_END])):
            score = -tiny(x, torch.full((2,), 999 * t)) / tiny.sde.std(t)
            dw = math.sqrt(t - t_next) * noise.steps[step]
            x = reverse_sde_step(x, score, tiny.sde, t, t - t_next, dw)
    torch.testing.assert_close(purified, ((x + 1) / 2).clamp(0, 1), rtol=0, atol=1e-6)


def test_diffpure_setting_takes_100_steps(tiny: ScoreSDEModel) -> None:
    purifier = make_sde_purifier(tiny, t_star=0.1, dt=1e-3)
    assert len(purifier.timesteps) == 100 and purifier.t_star == 100
    assert len(purifier.draw_noise(torch.Size([1, 3, 32, 32]), torch.Generator()).steps) == 100


def test_guidance_is_added_to_the_score(tiny: ScoreSDEModel) -> None:
    """One step with GDMP's MSE guidance: score = -ε / std + scale ∇ log p, whose gradient is
    -(x_t - x_in,t) / (1 - ᾱ(t)) in closed form."""
    scale = 0.5
    purifier = make_sde_purifier(tiny, guidance="mse", mse_scale=scale, t_star=0.02)
    assert len(purifier.timesteps) == 1
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    noise = fixed_noise(purifier, images.shape)
    x_input, t, sde = 2 * images - 1, 0.02, tiny.sde
    alpha_bar = tiny.alphas_cumprod[19]
    x = alpha_bar.sqrt() * x_input + (1 - alpha_bar).sqrt() * noise.forward
    target = math.sqrt(sde.alpha_bar(t)) * x_input + sde.std(t) * noise.targets[0]
    with torch.no_grad():
        eps = tiny(x, torch.full((2,), 999 * t))
        unguided_score = -eps / sde.std(t)
        guided_score = unguided_score - scale * (x - target) / sde.std(t) ** 2
        expected = [reverse_sde_step(x, score, sde, t, t - T_END, math.sqrt(t - T_END) * noise.steps[0])
                    for score in (guided_score, unguided_score)]
        purified = purifier(images, noise)
    guided, unguided = (((value + 1) / 2).clamp(0, 1) for value in expected)
    torch.testing.assert_close(purified, guided, rtol=0, atol=1e-5)
    assert (purified - unguided).abs().max() > 1e-3  # the guidance term is not negligible


@pytest.mark.parametrize("guidance", ["victim", "victim+mse"])
def test_sde_gradient_matches_finite_differences(tiny_diffusion: NoisePredictor, tiny_victim: nn.Module,
                                                 guidance: str) -> None:
    """Exact input gradient of a guided 3-step SDE purification (float64; the tiny DDPM's linear
    schedule is the same VP-SDE) against a central difference along a random direction. The
    guidance's share of it (double backward through the victim) far exceeds the tolerance."""
    diffusion, victim = copy.deepcopy(tiny_diffusion).double(), copy.deepcopy(tiny_victim).double()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = 0.1 + 0.8 * x  # x ± h v stays inside [0, 1]
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def slopes(name: str, h: float = 1e-5) -> tuple[float, float]:
        """(autograd, central difference) slope of a victim loss of the purification along v."""
        purifier = make_sde_purifier(diffusion, victim, guidance=name, victim_scale=1000.0)
        noise = fixed_noise(purifier, x.shape, seed=1, dtype=torch.float64)
        loss = lambda z: (victim(purifier(z, noise)) * weights_for(2, torch.float64)).sum()  # noqa: E731
        leaf = x.clone().requires_grad_(True)
        gradient, = torch.autograd.grad(loss(leaf), leaf)
        with torch.no_grad():
            numeric = (loss(x + h * direction) - loss(x - h * direction)) / (2 * h)
        return float((gradient * direction).sum()), float(numeric)

    (analytic, numeric), (unguided, _) = slopes(guidance), slopes("none")
    error, share = abs(analytic - numeric) / abs(numeric), abs(analytic - unguided) / abs(numeric)
    print(f"relative error {error:.2g}; the guidance's share of the slope {share:.2g}")
    assert error < 1e-6 and share > 1e-4


@pytest.mark.parametrize("guidance", ["none", "victim", "mse"])
def test_sde_checkpointed_gradient_equals_plain(tiny_diffusion: NoisePredictor, tiny_victim: nn.Module,
                                                tiny_images: torch.Tensor, guidance: str) -> None:
    plain = make_sde_purifier(tiny_diffusion, tiny_victim, guidance=guidance, frozen_noise=True)
    gradients, outputs = [], []
    for purifier in (plain, plain.variant(checkpoint_steps=True)):
        x = tiny_images.clone().requires_grad_(True)
        out = purifier(x)
        (tiny_victim(out) * weights_for(len(x))).sum().backward()
        gradients.append(x.grad)
        outputs.append(out.detach())
    assert torch.equal(outputs[0], outputs[1]) and gradients[0].abs().sum() > 0
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-6, atol=1e-9)


def test_sde_noise_comes_from_the_seed(tiny_diffusion: NoisePredictor,
                                      tiny_images: torch.Tensor) -> None:
    with torch.no_grad():
        frozen = make_sde_purifier(tiny_diffusion, frozen_noise=True, seed=3)
        assert torch.equal(frozen(tiny_images), frozen(tiny_images))
        other = make_sde_purifier(tiny_diffusion, frozen_noise=True, seed=4)(tiny_images)
        assert not torch.equal(frozen(tiny_images), other)


@pytest.mark.parametrize("options, message", [
    ({"sampler": "euler"}, "unknown sampler 'euler'"),
    ({"dt": 0.0}, "dt must be in"),
    ({"dt": 1.5}, "dt must be in"),
])
def test_bad_sampler_settings_are_refused(tiny_diffusion: NoisePredictor, options: dict,
                                          message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_sde_purifier(tiny_diffusion, **options)


# --- configs/cifar10-diffpure-original.yaml -------------------------------------------------------


def write_smoke_config(source: Path, target: Path) -> dict:
    """``source`` with a 2-step SDE (dt = 0.05), 1-step attacks (AutoAttack's APGD too) without
    EOT, and a random small victim in place of the WRN-28-10 (``--set`` cannot reach lists or
    drop ``victim_options``)."""
    config = load_yaml(source)
    for defense in config["defenses"]:
        if defense.get("kind", "purifier") == "purifier":
            defense["purifier"] = {**defense["purifier"], "dt": 0.05}
    for attack in config["attacks"]:
        if attack["kind"] != "clean":
            attack.update(steps=1, eot=1)
    torch.manual_seed(0)
    victim = target.with_name("small-resnet.safetensors")
    save_state_dict(load_classifier("cifar10-small-resnet"), victim)
    config["models"] = {**config["models"], "victim": str(victim), "victim_arch": "cifar10-small-resnet",
                        "victim_options": {}}
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def test_diffpure_original_config_runs_on_the_tiny_model(
        shared_file, require_shared: Callable[[str], Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every defence x attack of the config, its SDE purifier on the tiny NCSN++ (as checkpoint_8.pth
    with its config beside it), on 4 CIFAR-10 test images."""
    original = load_yaml(CONFIG)
    assert original["defenses"][1]["purifier"] == {"guidance": "none", "sampler": "sde", "t_star": 0.1,
                                                   "dt": 0.001}
    assert original["models"]["victim"] == "robustbench:Standard"
    monkeypatch.setenv("DISTPURE_DATA", str(require_shared("data/cifar10-jpeg").parent))
    config = write_smoke_config(CONFIG, tmp_path / "smoke.yaml")
    checkpoint = tmp_path / "checkpoint_8.pth"
    checkpoint.symlink_to(shared_file("ncsnpp_tiny_checkpoint.pth"))
    shutil.copy(shared_file("ncsnpp_tiny_config.json"), tmp_path / "checkpoint_8_config.json")
    run_dir = tmp_path / "run"
    assert main(["evaluate", str(tmp_path / "smoke.yaml"), "--limit", str(LIMIT), "--out", str(run_dir),
                 "--set", f"models.diffusion={checkpoint}"]) == 0
    records = read_records(run_dir / "results.jsonl")
    defenses = [d["name"] for d in config["defenses"]]
    attacks = [a["name"] for a in config["attacks"]]
    assert {(r["index"], r["defense"], r["attack"]) for r in records} == set(
        itertools.product(range(LIMIT), defenses, attacks))
    examples = load_file(run_dir / "examples" / "diffpure__clean.safetensors")
    assert examples["purified"].shape == (LIMIT, 3, 32, 32)
    assert not torch.equal(examples["purified"], examples["clean"])


def test_sde_time_labels_follow_each_network_family(tiny_diffusion):
    """DiffPure calls a discrete-step network (guided-diffusion) at step ⌊1000·t⌋ and score-SDE's
    continuous models at 999·t; times built as t* − k·dt in float64 still land on whole steps."""
    times = reverse_sde_times(0.1, 1e-3)
    assert [tiny_diffusion.sde_time_label(t) for t in times] == list(range(100, 0, -1))
    assert ScoreSDEModel.sde_time_label(tiny_diffusion, 0.1) == pytest.approx(99.9)
