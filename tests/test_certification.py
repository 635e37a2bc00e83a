"""Certification by denoised smoothing: the statistics against the reference implementation's
values, a linear base classifier whose smoothed probability is known in closed form, the
one-shot denoiser against an oracle noise predictor, config validation, curtailment, and
interrupted, resumed and sharded runs on tiny models (nothing loads the embedded models)."""
from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from scipy.stats import norm
from torch import nn

from conftest import require_shared_path
from distpure.certification import SmoothedClassifier, build_base_classifier, noise_level
from distpure.certification import denoisers as denoisers_module
from distpure.certification import runner as runner_module
from distpure.certification.config import load_certify_config
from distpure.certification.denoisers import OneShotDenoiser
from distpure.certification.runner import certify_records, run_certification
from distpure.certification.statistics import (certified_at, certify_counts, decided, max_certifiable_radius,
                                               predict_p_value)
from distpure.devices import resolve_precision
from distpure.evaluation.distributed import Shard
from distpure.evaluation.rundir import RunDirectory
from distpure.models.diffusion import NoisePredictor, default_scheduler

# ----------------------------------------------------------------------------- statistics


def test_statistics_reproduce_the_reference_implementation():
    """All 267 cases of the reference (Cohen et al.'s core.py with statsmodels and SciPy)."""
    reference = json.loads(require_shared_path("fixtures/smoothing/cohen_reference.json").read_text())
    assert len(reference["certify"]) + len(reference["predict"]) == 267
    for case in reference["certify"]:
        certificate = certify_counts(case["nA"], case["n"], case["alpha"], case["sigma"])
        assert certificate.p_lower == pytest.approx(case["p_lower"], rel=1e-12, abs=1e-15), case
        assert certificate.abstain == case["abstain"], case
        if case["radius"] is None:
            assert certificate.radius is None, case
        else:
            assert certificate.radius == pytest.approx(case["radius"], rel=1e-12, abs=1e-15), case
    for case in reference["predict"]:
        p_value = predict_p_value(case["top_count"], case["second_count"])
        assert p_value == pytest.approx(case["p_value"], rel=1e-12, abs=1e-300), case
        assert (p_value > case["alpha"]) == case["abstain"], case


def test_largest_certifiable_radius_is_all_draws_right():
    # all n right: the Clopper-Pearson lower bound is alpha^(1/n)
    assert max_certifiable_radius(1000, 0.001, 0.25) == pytest.approx(0.25 * norm.ppf(0.001 ** (1 / 1000)))
    all_right = certify_counts(1000, 1000, 0.001, 0.25)
    assert all_right.radius == pytest.approx(max_certifiable_radius(1000, 0.001, 0.25))


# ----------------------------------------------------------------------------- a linear toy

DIM = 8


class Linear:
    """f(x) = 1 if w·x + b > 0 else 0: under N(0, σ²I) noise, P(f = 1) = Φ((w·x + b) / (σ‖w‖)),
    and the smoothed classifier's exact robust radius is σ·Φ⁻¹(p) = |w·x + b| / ‖w‖."""

    def __init__(self, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.w = torch.randn(DIM, generator=generator, dtype=torch.float64)
        self.b = 0.1

    def __call__(self, noisy: torch.Tensor) -> torch.Tensor:
        return (noisy.reshape(len(noisy), -1).double() @ self.w + self.b > 0).long()

    def point(self, z: float, sigma: float) -> torch.Tensor:
        """An input whose smoothed probability of class 1 is Φ(z)."""
        norm_w = float(self.w.norm())
        x = (z * sigma * norm_w - self.b) * self.w / norm_w**2
        return x.reshape(1, 1, DIM)


@pytest.mark.parametrize("z", [0.3, 1.0, 2.0])
def test_linear_certificates_hold_with_probability_at_least_one_minus_alpha(z):
    """Over 300 independent certifications at α = 0.1, a certificate is wrong (a class other
    than the smoothed prediction, or a radius above the exact σ·Φ⁻¹(p) = σ z) in at most a
    fraction α, up to sampling error. A point estimate instead of the lower bound is wrong
    about half the time, and would fail."""
    sigma, alpha, repetitions = 0.5, 0.1, 300
    toy = Linear()
    x = toy.point(z, sigma)
    exact_radius = sigma * z
    smoothed = SmoothedClassifier(toy, num_classes=2, sigma=sigma, batch_size=200)
    wrong = 0
    radii = []
    for seed in range(repetitions):
        result = smoothed.certify(x, n0=10, n=100, alpha=alpha, seed=seed)
        if result.abstained:
            continue
        radii.append(result.radius)
        wrong += result.predicted != 1 or result.radius > exact_radius
    # failures ~ Binomial(300, <= 0.1): mean <= 30, sd <= 5.2; allow three sd
    assert wrong <= alpha * repetitions + 3 * math.sqrt(repetitions * alpha * (1 - alpha))
    assert len(radii) > 0 or z < 1.0
    assert all(r <= max_certifiable_radius(100, alpha, sigma) + 1e-12 for r in radii)
    if radii:
        assert np.median(radii) < exact_radius  # a lower bound, typically below the truth


def test_linear_predict_is_rarely_wrong():
    sigma, alpha = 0.5, 0.1
    toy = Linear(1)
    smoothed = SmoothedClassifier(toy, num_classes=2, sigma=sigma, batch_size=200)
    x = toy.point(0.2, sigma)  # P(class 1) = Φ(0.2) ≈ 0.58: a hard case for PREDICT
    predictions = [smoothed.predict(x, n=100, alpha=alpha, seed=seed).predicted for seed in range(200)]
    assert sum(p == 0 for p in predictions) <= alpha * 200 + 3 * math.sqrt(200 * alpha * (1 - alpha))
    assert any(p is None for p in predictions) and any(p == 1 for p in predictions)


def test_draws_are_seeded_per_sample_and_batch_size_changes_only_the_grouping():
    toy = Linear()
    x = toy.point(0.5, 0.5)
    smoothed = SmoothedClassifier(toy, num_classes=2, sigma=0.5, batch_size=64)
    first, again = (smoothed.certify(x, 10, 300, 0.01, seed=3) for _ in range(2))
    assert first == again
    assert smoothed.certify(x, 10, 300, 0.01, seed=4).count != first.count or \
        smoothed.certify(x, 10, 300, 0.01, seed=5).count != first.count


def test_a_wrong_selection_skips_the_estimation_but_records_the_class():
    toy = Linear()
    smoothed = SmoothedClassifier(toy, num_classes=2, sigma=0.5, batch_size=64)
    x = toy.point(2.5, 0.5)  # class 1 almost surely
    result = smoothed.certify(x, 10, 500, 0.01, seed=0, label=0, skip_wrong=True)
    assert result.skipped and result.predicted == 1 and result.drawn == 0 and result.count is None
    assert sum(result.selection_counts) == 10
    kept = smoothed.certify(x, 10, 500, 0.01, seed=0, label=1, skip_wrong=True)
    assert not kept.skipped and kept.drawn == 500


# ----------------------------------------------------------------------------- curtailment

def test_curtailed_runs_decide_every_reported_radius_as_the_full_run():
    sigma, alpha, n = 0.25, 0.001, 2000
    radii = (0.0, 0.25, 0.5, 128 / 255)
    toy = Linear(2)
    smoothed = SmoothedClassifier(toy, num_classes=2, sigma=sigma, batch_size=100)
    curtailed_any = 0
    for z in (-0.5, 0.0, 0.2, 0.6, 1.2, 1.8, 2.3, 2.7, 3.5):
        for seed in range(4):
            x = toy.point(z, sigma)
            full = smoothed.certify(x, 100, n, alpha, seed)
            short = smoothed.certify(x, 100, n, alpha, seed, curtail_radii=radii)
            assert short.predicted == full.predicted
            full_certificate = certify_counts(full.count, n, alpha, sigma)
            short_certificate = certify_counts(short.count, n, alpha, sigma)
            for r in radii:
                assert certified_at(short_certificate, r) == certified_at(full_certificate, r), (z, seed, r)
            assert short.abstained == full.abstained
            if short.curtailed:
                curtailed_any += 1
                assert short.drawn < n and short.count <= full.count
                assert decided(short.count, short.drawn, n, alpha, sigma, radii)
            else:
                assert short == full
    assert curtailed_any >= 10  # the test exercises curtailment, not only full runs


# ----------------------------------------------------------------------------- denoisers


class OracleNoise(NoisePredictor):
    """Predicts the noise it is told was added: the ideal ε model."""

    def __init__(self) -> None:
        super().__init__(default_scheduler().betas)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.noise: torch.Tensor | None = None

    image_channels = 3
    sample_size = 8

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.noise


def test_one_shot_denoiser_inverts_the_forward_scaling():
    """Noise whose model-unit level is exactly that of a grid step: the oracle's true ε gives
    back the image exactly; elsewhere, the error is the grid's mismatch times the noise."""
    oracle = OracleNoise()
    image = 0.1 + 0.8 * torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    alpha_bar = oracle.alphas_cumprod.double()
    step = 144
    sigma = float(((1 - alpha_bar[step]) / alpha_bar[step]).sqrt()) / 2  # exactly on the grid
    denoiser = OneShotDenoiser(oracle, sigma)
    assert denoiser.level.timestep == step and denoiser.level.model_noise == pytest.approx(2 * sigma)
    oracle.noise = eps  # the smoothing noise is σ ε in pixel units
    torch.testing.assert_close(denoiser(image + sigma * eps), image, atol=1e-5, rtol=0)
    off_grid = sigma * 1.003
    denoiser = OneShotDenoiser(oracle, off_grid)
    mismatch = abs(2 * off_grid - denoiser.level.model_noise) / 2  # in pixel units
    error = (denoiser(image + off_grid * eps) - image).abs()
    assert float((error - mismatch * eps.abs()).max()) < 1e-5


def test_continuous_time_models_get_the_exact_noise_level(monkeypatch):
    monkeypatch.setattr(denoisers_module, "is_continuous_time", lambda diffusion: True)
    level = noise_level(OracleNoise(), 0.25)
    assert level.continuous and level.model_noise == pytest.approx(0.5, rel=1e-12)
    assert level.timestep == 144  # the nearest grid step, where multistep samplers start


def test_reverse_denoisers_start_at_sigmas_step_without_forward_noise(tiny_diffusion, tiny_victim, monkeypatch):
    sigma = 0.12
    base = build_base_classifier(tiny_victim, tiny_diffusion, "multistep", sigma, steps=2)
    purifier = base.denoiser.purifier
    assert purifier.t_star == noise_level(tiny_diffusion, sigma).timestep == 70
    assert purifier.timesteps == [70, 35] and base.denoiser_calls == 2
    calls = []
    original = purifier.reverse_from
    monkeypatch.setattr(purifier, "reverse_from", lambda x_t, x_in, noise=None: calls.append(
        (x_t.clone(), x_in.clone())) or original(x_t, x_in, noise))
    noisy = torch.rand(3, 3, 16, 16) + sigma * torch.randn(3, 3, 16, 16)
    labels = base(noisy)
    monkeypatch.undo()
    assert labels.shape == (3,)
    x_t, x_input = calls[0]
    torch.testing.assert_close(x_input, noisy * 2 - 1)
    torch.testing.assert_close(x_t, math.sqrt(float(tiny_diffusion.alphas_cumprod[70])) * (noisy * 2 - 1))
    voted = build_base_classifier(tiny_victim, tiny_diffusion, "voted", sigma, steps=2, votes=3)
    guided = build_base_classifier(tiny_victim, tiny_diffusion, "guided", sigma, steps=2, guidance_scale=5.0)
    assert voted.denoiser_calls == 6 and voted(noisy).shape == (3,)
    assert guided.denoiser.purifier.config.guidance == "victim" and guided(noisy).shape == (3,)
    with pytest.raises(ValueError, match="step 70"):
        build_base_classifier(tiny_victim, tiny_diffusion, "multistep", sigma, steps=80)


def test_reverse_from_is_the_purifiers_own_reverse_process(tiny_diffusion, tiny_images):
    """The purifier split into forward diffusion and ``reverse_from``: together they purify as before."""
    from distpure.defenses.purifier import Purifier, PurifierConfig
    from distpure.sampling.schedule import forward_diffuse

    purifier = Purifier(tiny_diffusion, PurifierConfig(t_star=40, num_steps=3, guidance="none"))
    noise = purifier.draw_noise(tiny_images.shape, torch.Generator().manual_seed(0))
    x_input = tiny_images * 2 - 1
    x_t = forward_diffuse(x_input, tiny_diffusion.alphas_cumprod[40], noise.forward)
    with torch.no_grad():
        torch.testing.assert_close(purifier.reverse_from(x_t, x_input, noise), purifier(tiny_images, noise))


@pytest.mark.parametrize("model", ["score-sde", "adm"])
def test_denoisers_run_on_score_sde_and_adm_models(model, tiny_victim):
    """σ maps to the exact continuous time on a score-SDE model and to the nearest step on ADM
    (learned variance: only its ε channels are used); both denoise and classify draws."""
    from distpure.models.diffusion_loader import load_diffusion

    if model == "score-sde":
        require_shared_path("fixtures/score-sde/ncsnpp_tiny_config.json")
        from distpure.models.ncsnpp import load_score_sde

        diffusion = load_score_sde(require_shared_path("fixtures/score-sde/ncsnpp_tiny_checkpoint.pth"),
                                   require_shared_path("fixtures/score-sde/ncsnpp_tiny_config.json"))
    else:
        require_shared_path("fixtures/adm/adm_tiny_256_config.json")
        diffusion = load_diffusion(require_shared_path("fixtures/adm/adm_tiny_256.safetensors"))
    level = noise_level(diffusion, 0.25)
    assert level.continuous == (model == "score-sde")
    if model == "score-sde":
        assert level.model_noise == pytest.approx(0.5, rel=1e-9)
        assert isinstance(level.label, float)
    else:
        assert diffusion.learned_variance and abs(level.model_noise - 0.5) < 0.01
    size = diffusion.sample_size
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    for kind in ("one-shot", "multistep"):
        base = build_base_classifier(tiny_victim, diffusion, kind, 0.25, steps=1)
        smoothed = SmoothedClassifier(base, num_classes=10, sigma=0.25, batch_size=2)
        counts, drawn = smoothed.class_counts(image, 2, torch.Generator().manual_seed(1))
        assert drawn == 2 and int(counts.sum()) == 2


# ----------------------------------------------------------------------------- config

def _config(tmp_path: Path, **changes) -> Path:
    values = {"name": "c", "n0": 10, "n": 1000, "alpha": 0.001, "radii": [0.0, 0.25, "128/255"],
              "settings": [{"name": "one", "denoiser": "one-shot", "sigma": 0.25}]}
    for key, value in changes.items():
        if key == "setting":
            values["settings"] = [{**values["settings"][0], **value}]
        else:
            values[key] = value
    path = tmp_path / "certify.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"setting": {"sigma": 0}}, "sigma must be positive.*0"),
    ({"setting": {"sigma": -0.25}}, "sigma must be positive.*-0.25"),
    ({"alpha": 1.5}, r"alpha must lie in \(0, 1\), got 1.5"),
    ({"alpha": 0}, r"alpha must lie in \(0, 1\), got 0"),
    ({"n0": 0}, "n0 must be a whole number of at least 1, got 0"),
    ({"n": 0}, "n must be a whole number of at least 1, got 0"),
    ({"setting": {"n": 0}}, "n must be a whole number of at least 1, got 0"),
    ({"n": 100}, "n = 100 draws can never certify radius 0.502 at sigma 0.25"),
    ({"setting": {"sigma": 0.12, "n": 2000}}, "n = 2000 draws can never certify radius 0.502 at sigma 0.12"),
    ({"setting": {"denoiser": "two-shot"}}, "unknown denoiser kind 'two-shot'"),
    ({"setting": {"votes": 3}}, "votes is 3, but only denoiser 'voted' votes"),
])
def test_bad_settings_are_refused_when_read_naming_the_value(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        load_certify_config(_config(tmp_path, **changes))


def test_a_small_sigma_may_state_its_smaller_reach(tmp_path):
    config = load_certify_config(_config(tmp_path, setting={"sigma": 0.12, "n": 2000, "reach": 0.25}))
    assert config.report_radii == (0.0, 0.25, 128 / 255)
    with pytest.raises(ValueError, match="radius 0.33 at sigma 0.12"):
        load_certify_config(_config(tmp_path, setting={"sigma": 0.12, "n": 2000, "reach": 0.33}))


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COMMITTED = sorted(CONFIGS.glob("*-certify*.yaml"))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda path: path.name)
def test_the_committed_configs_are_valid(path):
    config = load_certify_config(path)
    assert config.alpha == 0.001 and config.n0 == 100


def test_the_headline_and_fine_tuned_configs_are_committed_and_certify_alike():
    """The fine-tuned row certifies the headline's images as the headline does, with the fine-tuned
    weights in the headline victim's architecture, at the headline's one-shot σ 0.25 setting."""
    assert {path.name for path in COMMITTED} >= {"cifar10-certify.yaml", "cifar10-certify-finetuned.yaml"}
    headline = load_certify_config(CONFIGS / "cifar10-certify.yaml")
    tuned = load_certify_config(CONFIGS / "cifar10-certify-finetuned.yaml")
    assert {s.sigma for s in headline.settings if s.denoiser == "one-shot"} == {0.12, 0.25, 0.5}
    for key in ("data", "n0", "alpha", "radii", "seed", "batch_size", "skip_wrong", "curtail"):
        assert getattr(tuned, key) == getattr(headline, key), key
    assert (tuned.models.victim, tuned.models.victim_arch) == ("results/cifar10-resnet18-denoised/model.safetensors",
                                                               headline.models.victim)
    (setting,) = tuned.settings
    assert (setting.name, setting.denoiser, setting.sigma, tuned.draws(setting)) == \
        ("one-shot-0.25-finetuned", "one-shot", 0.25, 2000)
    ours, theirs = vars(tuned.attack), vars(headline.attack)
    assert {**ours, "setting": None} == {**theirs, "setting": None} and ours["setting"] == setting.name


def test_a_victim_architecture_is_checked_when_read(tmp_path):
    with pytest.raises(ValueError, match="unknown models.victim_arch 'resnet-99'"):
        load_certify_config(_config(tmp_path, models={"victim": "weights.safetensors", "victim_arch": "resnet-99"}))


def test_a_weights_file_victim_is_loaded_into_its_architecture(tmp_path):
    """A fine-tuned victim: the weights file, not the architecture's own weights, in that architecture."""
    from distpure.models.classifiers import CLASSIFIERS
    from distpure.models.weights import save_state_dict

    torch.manual_seed(4)
    tuned = CLASSIFIERS.build("cifar10-small-resnet")
    save_state_dict(tuned, tmp_path / "tuned.safetensors")
    models = {"victim": str(tmp_path / "tuned.safetensors"), "victim_arch": "cifar10-small-resnet"}
    config = load_certify_config(_config(tmp_path, models=models, setting={"denoiser": "none"}))
    victim, diffusion = runner_module.load_models(config, torch.device("cpu"))
    assert diffusion is None and all(torch.equal(victim.state_dict()[k], v) for k, v in tuned.state_dict().items())


# ----------------------------------------------------------------------------- runs

PLUGIN = "distpure_test_certify_arch"
PLUGIN_SOURCE = '''
import torch
from torch import nn


def tiny_victim():
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.SiLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    class Victim(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = features

        def forward(self, images):
            brightness = images.mean(dim=(1, 2, 3)) - 0.5
            return self.features(images) + 40.0 * brightness[:, None] * torch.tensor([-1.0, 1.0])

    return Victim()
'''


@pytest.fixture(scope="module")
def run_assets(tmp_path_factory):
    """A tiny diffusers model, a module:callable victim and a 2-class, 6-image folder dataset."""
    from diffusers import UNet2DModel

    from distpure.models.diffusion import DiffusionModel

    root = tmp_path_factory.mktemp("certify-assets")
    (root / f"{PLUGIN}.py").write_text(PLUGIN_SOURCE)
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, norm_num_groups=8, add_attention=False)
    DiffusionModel(unet, default_scheduler()).save_pretrained(root / "diffusion")
    generator = np.random.default_rng(0)
    for label in range(2):
        folder = root / "data" / "test" / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(3):
            brightness = 0.35 + 0.3 * label + 0.05 * generator.random()
            pixels = np.clip(brightness + generator.normal(0, 0.05, (32, 32, 3)), 0, 1) * 255
            Image.fromarray(pixels.round().astype(np.uint8)).save(folder / f"{i}.png")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        importlib.import_module(PLUGIN)
        yield SimpleNamespace(root=root)
    sys.modules.pop(PLUGIN, None)


def _run_values(assets, **changes) -> dict:
    values = {"name": "tiny-certify",
              "data": {"dataset": "cifar10", "root": str(assets.root / "data"), "limit": None},
              "models": {"victim": f"{PLUGIN}:tiny_victim", "diffusion": str(assets.root / "diffusion")},
              "n0": 4, "n": 40, "alpha": 0.1, "batch_size": 16, "radii": [0.0, 0.1], "device": "cpu",
              "settings": [{"name": "multistep", "denoiser": "multistep", "sigma": 0.12, "steps": 2, "limit": 4},
                           {"name": "one-shot", "denoiser": "one-shot", "sigma": 0.12},
                           {"name": "none", "denoiser": "none", "sigma": 0.25}]}
    values.update(changes)
    return values


def _run_config(assets, tmp_path: Path, **changes):
    path = tmp_path / f"config{len(list(tmp_path.glob('config*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(_run_values(assets, **changes)))
    return load_certify_config(path)


def _without_time(records: list[dict]) -> list[dict]:
    return sorted(({k: v for k, v in r.items() if k != "seconds"} for r in records),
                  key=lambda r: (r["setting"], r["index"]))


class Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_records_of_a_straight_run(run_assets, tmp_path, monkeypatch):
    config = _run_config(run_assets, tmp_path)
    straight = run_certification(config, tmp_path / "straight", show_progress=False)
    reference = _without_time(certify_records(RunDirectory(tmp_path / "straight")))
    assert len(reference) == 4 + 6 + 6
    assert set(straight["settings"]) == {"multistep", "one-shot", "none"}
    assert straight["settings"]["multistep"]["images"] == 4

    original = runner_module.certify_sample
    made = []

    def killed_after_five(*args, **kwargs):
        if len(made) == 5:
            raise Killed
        made.append(args[1].name)
        return original(*args, **kwargs)

    monkeypatch.setattr(runner_module, "certify_sample", killed_after_five)
    with pytest.raises(Killed):
        run_certification(config, tmp_path / "resumed", show_progress=False)
    partial = certify_records(RunDirectory(tmp_path / "resumed"))
    assert len(partial) == 5 and made == ["multistep"] * 4 + ["one-shot"]  # the config's order
    monkeypatch.setattr(runner_module, "certify_sample", original)
    summary = runner_module.summarize_run(config, RunDirectory(tmp_path / "resumed"))
    assert summary["multistep"]["images"] == 4 and summary["one-shot"]["images"] == 1  # a partial run summarises
    assert summary["none"]["images"] == 0
    run_certification(config, tmp_path / "resumed", show_progress=False)
    assert _without_time(certify_records(RunDirectory(tmp_path / "resumed"))) == reference
    record = reference[0]
    assert {"index", "dataset_index", "setting", "label", "predicted", "selection_counts", "count", "drawn",
            "p_lower", "radius", "abstained", "correct", "denoiser_calls"} <= set(record)


def test_sharded_runs_write_the_records_of_a_straight_run(run_assets, tmp_path, monkeypatch):
    config = _run_config(run_assets, tmp_path)
    run_certification(config, tmp_path / "straight", show_progress=False)
    monkeypatch.setattr(Shard, "barrier", lambda self: None)
    for rank in (1, 0):  # rank 1 first: rank 0 merges the shard files when it finishes
        monkeypatch.setattr(runner_module, "current_shard", lambda device, rank=rank: Shard(rank, 2))
        run_certification(config, tmp_path / "sharded", show_progress=False)
    assert not list((tmp_path / "sharded").glob("results.rank*.jsonl"))
    assert (_without_time(certify_records(RunDirectory(tmp_path / "sharded")))
            == _without_time(certify_records(RunDirectory(tmp_path / "straight"))))


def test_a_resume_with_other_settings_is_refused(run_assets, tmp_path):
    config = _run_config(run_assets, tmp_path, settings=[{"name": "none", "denoiser": "none", "sigma": 0.25}])
    run_certification(config, tmp_path / "run", show_progress=False)
    changed = _run_config(run_assets, tmp_path, settings=[{"name": "none", "denoiser": "none", "sigma": 0.5}])
    with pytest.raises(ValueError, match="sigma"):
        run_certification(changed, tmp_path / "run", show_progress=False)
    grown = _run_config(run_assets, tmp_path, settings=[{"name": "none", "denoiser": "none", "sigma": 0.25}],
                        description="a new description", paired_with=str(tmp_path / "another-run"))
    run_certification(grown, tmp_path / "run", show_progress=False)  # presentation may change
    before = _without_time(certify_records(RunDirectory(tmp_path / "run")))
    appended = _run_config(run_assets, tmp_path, settings=[{"name": "none", "denoiser": "none", "sigma": 0.25},
                                                           {"name": "wider", "denoiser": "none", "sigma": 0.5}])
    run_certification(appended, tmp_path / "run", show_progress=False)  # a setting may be appended
    after = _without_time(certify_records(RunDirectory(tmp_path / "run")))
    assert [r for r in after if r["setting"] == "none"] == before and len(after) == 2 * len(before)


def test_a_resume_may_write_the_precision_auto_resolved_to(run_assets, tmp_path):
    """``auto`` may become the precision it resolved to (an fp32 run continued on a bf16 CPU), the
    purifier's copy of it too; another resolved precision is refused."""
    multistep = [{"name": "multistep", "denoiser": "multistep", "sigma": 0.12, "steps": 2, "limit": 2}]
    run_certification(_run_config(run_assets, tmp_path, settings=multistep), tmp_path / "run", show_progress=False)
    written = _run_config(run_assets, tmp_path, settings=multistep, precision=resolve_precision("auto", "cpu"))
    run_certification(written, tmp_path / "run", show_progress=False)
    other = _run_config(run_assets, tmp_path, settings=multistep, precision="fp16")
    with pytest.raises(ValueError, match="resolved_precision"):
        run_certification(other, tmp_path / "run", show_progress=False)


def test_the_cli_certifies_and_summarises_a_run(run_assets, tmp_path, capsys):
    from distpure.cli.main import main

    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(_run_values(run_assets, settings=[
        {"name": "one-shot", "denoiser": "one-shot", "sigma": 0.12}])))
    assert main(["certify", str(path), "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert "one-shot" in printed and "r=0.1" in printed and "6/6" in printed
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["settings"]["one-shot"]["images"] == 6
    session = json.loads((tmp_path / "cli" / "sessions.jsonl").read_text().splitlines()[-1])
    assert session["planned"] == {"one-shot": 6} and session["image_shape"] == [3, 32, 32]
    report = tmp_path / "cli" / "report.md"
    assert f"report: {report}" in printed and "| one-shot | 6/6 |" in report.read_text()
    report.unlink()
    assert main(["certify", str(path), "--out", str(tmp_path / "cli"), "--summary"]) == 0
    assert "one-shot" in capsys.readouterr().out and report.is_file()
    assert main(["certify", str(path), "--out", str(tmp_path / "cli"), "--set", "alpha=2"]) == 2
    assert "alpha must lie in (0, 1), got 2" in capsys.readouterr().err
