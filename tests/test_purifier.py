"""The purifier on a tiny random DDPM and victim: shapes, seeding, guidance, gradients, validation,
and the reverse step against diffusers' DDIM and DDPM schedulers."""
from __future__ import annotations

import copy
import multiprocessing
import shutil

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from conftest import make_tiny_diffusion, make_tiny_images, make_tiny_victim

from distpure.defenses.defended import DefendedClassifier
from distpure.defenses.purifier import PurificationNoise, Purifier, PurifierConfig
from distpure.models.diffusion import DiffusionModel
from distpure.sampling.reverse import predict_x0, reverse_step, step_coefficients
from distpure.sampling.schedule import resolve_t_star, reverse_timesteps

GUIDANCES = ["none", "victim", "mse", "victim+mse"]
SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                clip_sample=True)


def make_purifier(diffusion: DiffusionModel, victim: nn.Module | None = None, **options) -> Purifier:
    """A small, fast purifier: t* = 50, 5 strided steps, fp32 unless overridden."""
    settings = dict(t_star=50, num_steps=5, precision="fp32", guidance="none")
    settings.update(options)
    return Purifier(diffusion, PurifierConfig(**settings), victim=victim)


def fixed_noise(purifier: Purifier, shape: torch.Size, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> PurificationNoise:
    noise = purifier.draw_noise(shape, torch.Generator().manual_seed(seed))
    return PurificationNoise(noise.forward.to(dtype), noise.steps.to(dtype), noise.targets.to(dtype))


def weights_for(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fixed random weights on the 10 logits: a generic scalar loss of the victim's output."""
    return torch.randn(n, 10, generator=torch.Generator().manual_seed(2), dtype=dtype)


# --- output shape and range ------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", GUIDANCES)
@pytest.mark.parametrize("num_steps, eta", [(None, 1.0), (None, 0.0), (5, 1.0), (5, 0.0)])
def test_output_shape_and_range(tiny_diffusion, tiny_victim, guidance, num_steps, eta):
    """Images in [0.25, 0.75] come back in [0, 1] because a short purification keeps them near
    their input, not because the final clamp cuts them off: few pixels end at 0 or 1."""
    images = make_tiny_images(2, low=0.25, high=0.75)
    t_star = 8 if num_steps is None else 50  # every DDPM step from t* = 8
    purifier = make_purifier(tiny_diffusion, tiny_victim, guidance=guidance, t_star=t_star,
                             num_steps=num_steps, eta=eta, victim_scale=30.0)
    assert len(purifier.timesteps) == (t_star if num_steps is None else num_steps)
    with torch.no_grad():
        out = purifier(images)
    assert out.shape == images.shape
    assert out.dtype == images.dtype
    assert torch.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
    clamped = ((out == 0) | (out == 1)).float().mean()
    assert clamped <= 0.01, float(clamped)
    assert 0 < (out - images).abs().mean() < 0.15


@pytest.mark.filterwarnings("ignore:precision='bf16' on a CPU without native bfloat16")
@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16"])
def test_autocast_precisions_and_chunking(tiny_diffusion, tiny_victim, precision):
    """The default (``auto``) and the explicit autocast paths, a batch split into chunks of 2."""
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    settings = {} if precision == "auto" else {"precision": precision}
    purifier = Purifier(tiny_diffusion, PurifierConfig(t_star=30, num_steps=3, batch_size=2, **settings),
                        victim=tiny_victim)
    assert purifier.config.precision == precision
    with torch.no_grad():
        out = purifier(images)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_fraction_t_star(tiny_diffusion):
    purifier = make_purifier(tiny_diffusion, t_star=0.05, num_steps=5)
    assert purifier.t_star == 50
    assert purifier.timesteps == [50, 40, 30, 20, 10]


# --- determinism -----------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", ["none", "victim+mse"])
def test_same_seed_same_output(tiny_diffusion, tiny_victim, tiny_images, guidance):
    with torch.no_grad():
        a = make_purifier(tiny_diffusion, tiny_victim, guidance=guidance, seed=7)(tiny_images)
        b = make_purifier(tiny_diffusion, tiny_victim, guidance=guidance, seed=7)(tiny_images)
        c = make_purifier(tiny_diffusion, tiny_victim, guidance=guidance, seed=8)(tiny_images)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a - c).abs().max() > 1e-3


def test_frozen_noise_repeats_and_fresh_noise_does_not(tiny_diffusion, tiny_images):
    frozen = make_purifier(tiny_diffusion, frozen_noise=True, seed=3)
    fresh = make_purifier(tiny_diffusion, seed=3)
    with torch.no_grad():
        f1, f2 = frozen(tiny_images), frozen(tiny_images)
        n1, n2 = fresh(tiny_images), fresh(tiny_images)
    assert torch.equal(f1, f2)
    assert not torch.equal(n1, n2)
    # frozen noise is drawn per sample (keyed by position unless bound): a sample alone at the
    # front of a call sees the noise it had there in the pair, and the other sample its own
    with torch.no_grad():
        alone, moved = frozen(tiny_images[:1]), frozen(tiny_images[1:])
    assert torch.allclose(alone, f1[:1], atol=1e-5)  # another batch size: float round-off only
    assert (moved - f1[1:]).abs().max() > 1e-2


def test_reseed_reproduces(tiny_diffusion, tiny_images):
    purifier = make_purifier(tiny_diffusion, seed=0)
    with torch.no_grad():
        first = purifier(tiny_images)
        purifier(tiny_images)
        purifier.reseed(0)
        again = purifier(tiny_images)
        purifier.reseed(11)
        a = purifier(tiny_images)
        purifier.reseed(11)
        b = purifier(tiny_images)
    assert torch.equal(first, again)
    assert torch.equal(a, b)
    assert not torch.equal(a, first)


def test_explicit_noise_fixes_output(tiny_diffusion, tiny_images):
    purifier = make_purifier(tiny_diffusion)
    noise = fixed_noise(purifier, tiny_images.shape, seed=4)
    with torch.no_grad():
        assert torch.equal(purifier(tiny_images, noise), purifier(tiny_images, noise))


# --- guidance direction ----------------------------------------------------------------------------


def test_victim_guidance_raises_victim_confidence(tiny_diffusion, tiny_victim):
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    options = dict(t_star=100, num_steps=10)
    guided = make_purifier(tiny_diffusion, tiny_victim, guidance="victim", victim_scale=3000.0, **options)
    plain = make_purifier(tiny_diffusion, tiny_victim, guidance="none", **options)
    noise = guided.draw_noise(images.shape, torch.Generator().manual_seed(0))
    with torch.no_grad():
        guided_out, plain_out = guided(images, noise), plain(images, noise)
        guided_conf = F.log_softmax(tiny_victim(guided_out), 1).max(1).values
        plain_conf = F.log_softmax(tiny_victim(plain_out), 1).max(1).values
    assert not torch.equal(guided_out, plain_out)
    assert (guided_conf > plain_conf).all(), (guided_conf, plain_conf)
    assert guided_conf.mean() > plain_conf.mean() + 1e-3


def test_mse_guidance_stays_closer_to_input(tiny_diffusion, tiny_images):
    options = dict(t_star=100, num_steps=10)
    guided = make_purifier(tiny_diffusion, guidance="mse", mse_scale=0.5, **options)
    plain = make_purifier(tiny_diffusion, guidance="none", **options)
    noise = guided.draw_noise(tiny_images.shape, torch.Generator().manual_seed(0))
    assert noise.targets.shape == noise.steps.shape  # GDMP target noise is drawn
    with torch.no_grad():
        guided_mse = (guided(tiny_images, noise) - tiny_images).pow(2).flatten(1).mean(1)
        plain_mse = (plain(tiny_images, noise) - tiny_images).pow(2).flatten(1).mean(1)
    assert (guided_mse < plain_mse).all(), (guided_mse, plain_mse)


# --- gradients -------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", GUIDANCES)
def test_gradients_reach_input(tiny_diffusion, tiny_victim, tiny_images, guidance):
    purifier = make_purifier(tiny_diffusion, tiny_victim, guidance=guidance, frozen_noise=True)
    x = tiny_images.clone().requires_grad_(True)
    (tiny_victim(purifier(x)) * weights_for(len(x))).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


@pytest.fixture
def double_setup(tiny_diffusion, tiny_victim):
    """The tiny model and victim in float64 (copies: the fixtures stay float32)."""
    return copy.deepcopy(tiny_diffusion).double(), copy.deepcopy(tiny_victim).double()


def _loss_and_gradient(purifier, victim, noise, x, weights):
    def loss(z: torch.Tensor) -> torch.Tensor:
        return (victim(purifier(z, noise)) * weights).sum()

    x = x.clone().requires_grad_(True)
    gradient, = torch.autograd.grad(loss(x), x)
    return loss, gradient


@pytest.mark.parametrize("guidance, options", [("victim", {}), ("victim+mse", {}),
                                               ("victim", {"target": "soft", "soft_temperature": 0.05})])
def test_gradient_matches_finite_differences(double_setup, guidance, options):
    """Exact input gradient of a 5-step guided purification (float64) vs central differences.

    The guidance shift ε - sqrt(1-ᾱ) ∇ log p(y | x̂0) depends on x_t; its derivative needs the
    double backward through the victim, which these directional derivatives check (to 1e-6: a
    soft-target gradient that held its weights constant was off by 2e-4 here). The sharpened
    soft target's weights q_c move with x_t too."""
    diffusion, victim = double_setup
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = 0.1 + 0.8 * x  # x ± h v stays inside [0, 1]
    weights = weights_for(2, torch.float64)
    guided = make_purifier(diffusion, victim, guidance=guidance, victim_scale=1000.0, **options)
    plain = make_purifier(diffusion, victim, guidance="none")
    noise = fixed_noise(guided, x.shape, seed=1, dtype=torch.float64)
    loss, gradient = _loss_and_gradient(guided, victim, noise, x, weights)
    _, plain_gradient = _loss_and_gradient(plain, victim, noise, x, weights)
    assert gradient.dtype == torch.float64
    generator = torch.Generator().manual_seed(3)
    h = 1e-5
    guidance_effects = []
    for _ in range(3):
        direction = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            numeric = (loss(x + h * direction) - loss(x - h * direction)) / (2 * h)
        analytic = (gradient * direction).sum()
        assert abs(analytic - numeric) < 1e-6 * abs(numeric), (float(analytic), float(numeric))
        guidance_effects.append(abs(analytic - (plain_gradient * direction).sum()) / abs(numeric))
    # the guidance changes the gradient by far more than the tolerance: the check has teeth
    assert max(guidance_effects) > 1e-2


@pytest.mark.parametrize("guidance", GUIDANCES)
def test_checkpointed_gradient_equals_plain(tiny_diffusion, tiny_victim, tiny_images, guidance):
    plain = make_purifier(tiny_diffusion, tiny_victim, guidance=guidance, frozen_noise=True)
    checkpointed = plain.variant(checkpoint_steps=True)
    assert checkpointed.config.checkpoint_steps and not plain.config.checkpoint_steps
    gradients, outputs = [], []
    for purifier in (plain, checkpointed):
        x = tiny_images.clone().requires_grad_(True)
        out = purifier(x)
        (tiny_victim(out) * weights_for(len(x))).sum().backward()
        gradients.append(x.grad)
        outputs.append(out.detach())
    assert torch.equal(outputs[0], outputs[1])
    assert gradients[0].abs().sum() > 0
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-6, atol=1e-9)



# --- straight-through victim guidance --------------------------------------------------------------


def _output_and_gradient(purifier: Purifier, noise: PurificationNoise, x: torch.Tensor,
                         weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The purification of ``x`` as an attacker runs it (input gradients on) and the input
    gradient of ``sum(weights * output)``."""
    x = x.clone().requires_grad_(True)
    output = purifier(x, noise)
    gradient, = torch.autograd.grad((output * weights).sum(), x)
    return output.detach(), gradient


@pytest.mark.parametrize("guidance", ["victim", "victim+mse"])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_straight_through_purifies_as_hard_and_differentiates_without_the_shift(double_setup, guidance,
                                                                                 checkpoint):
    """One unclipped reverse step in float64: its output is linear in the guidance shift, and the
    step's input is the same for every target, so the straight-through gradient, the hard shift
    held constant, must equal the soft target's (whose shift is zero) while its output is the
    hard target's, bit for bit."""
    diffusion, victim = double_setup
    x = make_tiny_images(2, low=0.3, high=0.7).double()
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    results = {}
    for target in ("hard", "soft", "straight-through"):
        purifier = make_purifier(diffusion, victim, guidance=guidance, target=target, t_star=10,
                                 num_steps=1, clip_x0=False, victim_scale=1000.0,
                                 checkpoint_steps=checkpoint)
        noise = fixed_noise(purifier, x.shape, dtype=torch.float64)
        results[target] = _output_and_gradient(purifier, noise, x, weights)
    (hard, hard_gradient), (soft, soft_gradient), (straight, straight_gradient) = results.values()
    assert 0 < straight.min() and straight.max() < 1  # nothing clamped: linear in the shift
    assert torch.equal(straight, hard) and not torch.allclose(straight, soft)
    torch.testing.assert_close(straight_gradient, soft_gradient, rtol=1e-10, atol=0)
    difference = (straight_gradient - hard_gradient).norm() / hard_gradient.norm()
    assert difference > 1e-6, float(difference)  # far beyond float64 rounding: the check has teeth


def test_soft_target_purifies_and_differentiates_as_no_guidance(double_setup):
    """Σ_c p_c ∇ log p_c = ∇ Σ_c p_c = 0: the victim's own distribution as the target shifts
    nothing, so its purification and its exact gradient are the unguided ones (float64), while
    the hard target's differ; holding p_c constant in the derivative made it look robust."""
    diffusion, victim = double_setup
    x = make_tiny_images(2, low=0.2, high=0.8).double()
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    results = {}
    for guidance, target in (("none", "hard"), ("victim", "soft"), ("victim", "hard")):
        purifier = make_purifier(diffusion, victim, guidance=guidance, target=target, victim_scale=1000.0)
        results[guidance, target] = _output_and_gradient(purifier, fixed_noise(purifier, x.shape, dtype=torch.float64),
                                                         x, weights)
    (plain, plain_gradient), (soft, soft_gradient), (hard, hard_gradient) = results.values()
    torch.testing.assert_close(soft, plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(soft_gradient, plain_gradient, rtol=1e-9, atol=1e-12)
    assert (hard - plain).abs().max() > 1e-4 and not torch.allclose(hard_gradient, plain_gradient)


def test_straight_through_output_is_the_hard_targets_bit_for_bit(tiny_diffusion, tiny_victim, tiny_images):
    """Five clipped float32 steps, with and without input gradients: the straight-through copy
    purifies exactly as the hard target; only the attacker's gradient changes."""
    hard = make_purifier(tiny_diffusion, tiny_victim, guidance="victim", victim_scale=1000.0)
    straight = hard.variant(target="straight-through")
    noise = fixed_noise(hard, tiny_images.shape)
    weights = torch.randn(tiny_images.shape, generator=torch.Generator().manual_seed(2))
    (hard_output, hard_gradient), (output, gradient) = (
        _output_and_gradient(purifier, noise, tiny_images, weights) for purifier in (hard, straight))
    assert torch.equal(output, hard_output)
    with torch.no_grad():
        assert torch.equal(straight(tiny_images, noise), hard(tiny_images, noise))
    assert not torch.allclose(gradient, hard_gradient)


def _peak_gradient_memory(steps: int, checkpointed: bool, results) -> None:
    """In a fresh process: resident-memory growth (MiB) of one exact gradient through a
    victim-guided purification of 8 tiny images with ``steps`` reverse steps."""
    from distpure.benchmarks.resources import measure

    purifier = make_purifier(make_tiny_diffusion(), make_tiny_victim(), guidance="victim", t_star=200,
                             num_steps=steps, checkpoint_steps=checkpointed)
    images = make_tiny_images(8).requires_grad_(True)
    results.put(measure(lambda: purifier(images).sum().backward())[1])


def test_checkpointed_gradient_memory_does_not_grow_with_steps():
    """The exact-gradient memory target on a tiny model: checkpointed, 24 steps need at most
    1.5x the memory of 3 steps, while plain autograd at 24 steps needs several times more."""
    context = multiprocessing.get_context("spawn")
    peaks = {}
    for steps, checkpointed in ((3, True), (24, True), (24, False)):
        results = context.Queue()
        child = context.Process(target=_peak_gradient_memory, args=(steps, checkpointed, results))
        child.start()
        peaks[steps, checkpointed] = results.get(timeout=300)
        child.join()
    if None in peaks.values():
        pytest.skip("peak resident memory cannot be reset here (needs Linux /proc/self/clear_refs)")
    assert peaks[24, True] <= 1.5 * peaks[3, True], peaks
    assert peaks[24, False] > 3 * peaks[24, True], peaks

# --- input validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("images, error, message", [
    (torch.rand(3, 16, 16), ValueError, r"N x C x H x W"),
    (torch.rand(1, 1, 16, 16), ValueError, r"1 channels.*expects 3"),
    (torch.rand(1, 3, 32, 32), ValueError, r"32x32.*16x16"),
    (torch.full((1, 3, 16, 16), float("nan")), ValueError, r"NaN"),
    (torch.full((1, 3, 16, 16), 2.0), ValueError, r"\[0, 1\]"),
    (-torch.rand(1, 3, 16, 16) - 0.1, ValueError, r"\[0, 1\]"),
    (torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8), TypeError, r"dtype torch.uint8"),
], ids=["ndim", "channels", "size", "nan", "above-one", "negative", "integer"])
def test_invalid_images_are_refused(tiny_diffusion, images, error, message):
    purifier = make_purifier(tiny_diffusion)
    with pytest.raises(error, match=message):
        purifier(images)


def test_images_with_inf_are_refused(tiny_diffusion, tiny_images):
    images = tiny_images.clone()
    images[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="Inf"):
        make_purifier(tiny_diffusion)(images)


def test_victim_guidance_needs_victim(tiny_diffusion):
    with pytest.raises(ValueError, match="victim"):
        make_purifier(tiny_diffusion, None, guidance="victim")


def test_unknown_guidance_is_refused(tiny_diffusion):
    with pytest.raises(ValueError, match="unknown guidance 'magic'"):
        make_purifier(tiny_diffusion, guidance="magic")


# --- reverse_step vs diffusers ---------------------------------------------------------------------


def _float64(scheduler):
    """A diffusers scheduler whose ᾱ are float64 (as in ``DiffusionModel``), for exact comparison."""
    scheduler.alphas_cumprod = torch.cumprod(1.0 - scheduler.betas.double(), dim=0)
    one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = one
    if hasattr(scheduler, "one"):
        scheduler.one = one
    return scheduler


def _random_state(seed: int, dtype=torch.float64, shape=(2, 3, 8, 8)):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=generator, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("t", [100, 50, 10, 0])
def test_ddim_step_matches_diffusers(eta, t):
    """A 10-step stride from t* = 100 (diffusers' 'leading' spacing with 100 inference steps).

    With clipping, distpure re-derives ε from the clipped x̂0 for the DDIM direction (as in
    guided-diffusion); that is diffusers' ``use_clipped_model_output=True``, and it is what makes
    η = 1 the DDPM posterior (checked against DDPMScheduler below)."""
    scheduler = _float64(DDIMScheduler(**SCHEDULE, set_alpha_to_one=True))
    scheduler.set_timesteps(100)
    assert t in scheduler.timesteps.tolist()
    assert reverse_timesteps(100, 10) == scheduler.timesteps.tolist()[-11:-1]
    x_t, eps, noise = _random_state(t)
    t_prev = t - 10 if t >= 10 else -1
    c = step_coefficients(scheduler.alphas_cumprod, t, t_prev)
    ours = reverse_step(x_t, eps, c, noise, eta=eta, clip=True)
    reference = scheduler.step(eps, t, x_t, eta=eta, variance_noise=noise,
                               use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    if t > 0:  # the comparison exercises clipping
        assert (predict_x0(x_t, eps, c.alpha_bar, clip=False).abs() > 1).any()


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("t", [100, 50, 10])
def test_ddim_step_without_clipping_matches_diffusers(eta, t):
    scheduler = _float64(DDIMScheduler(**{**SCHEDULE, "clip_sample": False}, set_alpha_to_one=True))
    scheduler.set_timesteps(100)
    x_t, eps, noise = _random_state(t + 1)
    ours = reverse_step(x_t, eps, step_coefficients(scheduler.alphas_cumprod, t, t - 10), noise,
                        eta=eta, clip=False)
    reference = scheduler.step(eps, t, x_t, eta=eta, variance_noise=noise).prev_sample
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [999, 100, 57, 2, 1, 0])
def test_ddpm_step_matches_diffusers(t):
    """Every-step η = 1 is ancestral DDPM with the posterior ("fixed_small") variance.

    DDPMScheduler draws its noise as torch.randn(shape, generator, dtype=model_output.dtype)
    on the CPU, so the same seed reproduces it."""
    scheduler = _float64(DDPMScheduler(**SCHEDULE, variance_type="fixed_small"))
    x_t, eps, _ = _random_state(t + 7)
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t), dtype=x_t.dtype)
    c = step_coefficients(scheduler.alphas_cumprod, t, t - 1)
    ours = reverse_step(x_t, eps, c, noise, eta=1.0, clip=True)
    reference = scheduler.step(eps, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert c.is_final == (t == 0)


@pytest.mark.parametrize("t", [999, 100, 2, 1])
def test_ddpm_step_float32_inputs(t):
    """float32 images with the float64 schedule of ``DiffusionModel`` (as the purifier runs)."""
    scheduler = _float64(DDPMScheduler(**SCHEDULE, variance_type="fixed_small"))
    x_t, eps, _ = _random_state(t + 3, dtype=torch.float32)
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t))
    ours = reverse_step(x_t, eps, step_coefficients(scheduler.alphas_cumprod, t, t - 1), noise)
    assert ours.dtype == torch.float32
    # float32 ε makes diffusers draw float32 noise from the same seed; the float64 sample keeps
    # its arithmetic in float64
    reference = scheduler.step(eps, t, x_t.double(), generator=torch.Generator().manual_seed(t)).prev_sample
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-5)


# --- schedule helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize("t_star, expected", [
    (100, 100), (1, 1), (999, 999), (0.1, 100), (0.15, 150), (0.0004, 0), (0.5, 500),
])
def test_resolve_t_star(t_star, expected):
    if expected == 0:
        with pytest.raises(ValueError, match="t_star must be in"):
            resolve_t_star(t_star, 1000)
    else:
        assert resolve_t_star(t_star, 1000) == expected


@pytest.mark.parametrize("t_star", [0, -5, 1000, 5000])
def test_resolve_t_star_out_of_range(t_star):
    with pytest.raises(ValueError, match=rf"t_star must be in \[1, 999\].*got {t_star}"):
        resolve_t_star(t_star, 1000)


def test_reverse_timesteps_examples():
    assert reverse_timesteps(100, 10) == [100, 90, 80, 70, 60, 50, 40, 30, 20, 10]
    assert reverse_timesteps(5) == [5, 4, 3, 2, 1]
    assert reverse_timesteps(5, 5) == [5, 4, 3, 2, 1]
    assert reverse_timesteps(100, 1) == [100]
    assert reverse_timesteps(1) == [1]
    assert reverse_timesteps(7, 3) == [7, 5, 2]


@pytest.mark.parametrize("t_star", [*range(1, 41), 100, 150, 999])
def test_reverse_timesteps_are_strictly_descending(t_star):
    for num_steps in [None, *range(1, t_star + 1)]:
        steps = reverse_timesteps(t_star, num_steps)
        assert len(steps) == (t_star if num_steps is None else num_steps)
        assert steps[0] == t_star and steps[-1] >= 1
        assert all(a > b for a, b in zip(steps, steps[1:])), (t_star, num_steps, steps)


@pytest.mark.parametrize("num_steps", [0, -1, 101])
def test_reverse_timesteps_out_of_range(num_steps):
    with pytest.raises(ValueError, match=rf"num_steps must be in \[1, t_star=100\], got {num_steps}"):
        reverse_timesteps(100, num_steps)


def test_purifier_refuses_bad_t_star(tiny_diffusion):
    with pytest.raises(ValueError, match="t_star"):
        make_purifier(tiny_diffusion, t_star=1000)
    with pytest.raises(ValueError, match="num_steps"):
        make_purifier(tiny_diffusion, t_star=5, num_steps=10)


# --- defended classifier ---------------------------------------------------------------------------


def test_defended_classifier_votes_give_log_probabilities(tiny_diffusion, tiny_victim, tiny_images):
    purifier = make_purifier(tiny_diffusion, tiny_victim, guidance="victim", t_star=30, num_steps=3)
    defended = DefendedClassifier(tiny_victim, purifier, votes=3)
    x = tiny_images.clone().requires_grad_(True)
    log_probs = defended(x)
    assert log_probs.shape == (len(x), 10)
    assert (log_probs <= 0).all()
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(len(x)), rtol=0, atol=1e-5)
    F.nll_loss(log_probs, torch.tensor([0, 1])).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_defended_classifier_single_vote_and_no_purifier(tiny_diffusion, tiny_victim, tiny_images):
    purifier = make_purifier(tiny_diffusion, frozen_noise=True)
    with torch.no_grad():
        assert torch.equal(DefendedClassifier(tiny_victim, None)(tiny_images), tiny_victim(tiny_images))
        assert torch.equal(DefendedClassifier(tiny_victim, purifier)(tiny_images),
                           tiny_victim(purifier(tiny_images)))
    with pytest.raises(ValueError, match="votes must be at least 1"):
        DefendedClassifier(tiny_victim, purifier, votes=0)


# --- speed options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["channels_last", "compile"])
def test_speed_options_do_not_change_the_purification(tiny_diffusion, tiny_victim, tiny_images, option):
    """NHWC layout and torch.compile are pure speed-ups: same noise, same output and gradient."""
    if option == "compile" and not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile's CPU backend (inductor) needs a C++ compiler; none is installed")
    diffusion = copy.deepcopy(tiny_diffusion)  # channels_last converts the model in place
    plain = make_purifier(diffusion, tiny_victim, guidance="victim")
    fast = make_purifier(diffusion, tiny_victim, guidance="victim", **{option: True})
    noise = fixed_noise(plain, tiny_images.shape)
    images = tiny_images.clone().requires_grad_(True)
    outputs, gradients = [], []
    for purifier in (plain, fast):
        output = purifier(images, noise)
        gradients.append(torch.autograd.grad(output.pow(2).sum(), images)[0])
        outputs.append(output.detach())
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert torch.allclose(gradients[0], gradients[1], atol=1e-5)
    assert "_compiled" not in dict(diffusion.named_modules())
    assert set(diffusion.state_dict()) == set(tiny_diffusion.state_dict())
