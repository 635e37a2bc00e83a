"""The purification defence: forward-diffuse the input to t*, then reverse to 0 with guidance.

Differentiable end to end (the guidance gradient too, by double backward), seeded, batched,
and optionally checkpointed per reverse step so that exact gradients through long reverse
processes fit in memory.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Iterator

import torch
from torch import nn

from ..devices import autocast, check_precision
from ..models.noise_predictor import NoisePredictor
from ..sampling.reverse import StepCoefficients, predict_x0, reverse_step, step_coefficients
from ..sampling.schedule import forward_diffuse, resolve_t_star, reverse_timesteps
from ..sampling.sde import T_END, reverse_sde_step, reverse_sde_times
from ..seeding import derive_seed
from ..validation import check_choice, check_unit_images
from .guidance import SCHEDULES, TARGETS, Guidance, GuidanceState, build_guidance, guidance_terms
from .recompute import recomputed_in_backward


SAMPLERS = ("ddpm", "sde")
#: the settings that make the guidance object (``build_guidance``)
GUIDANCE_SETTINGS = ("guidance", "victim_scale", "mse_scale", "schedule", "target", "soft_temperature")


@dataclass
class PurifierConfig:
    """How to purify. ``guidance`` is ``none`` (DiffPure), ``victim`` (the paper), ``mse`` (GDMP)
    or a ``+`` combination; ``num_steps=None`` runs every DDPM step from t*. ``sampler`` is
    ``ddpm`` (DDPM/DDIM steps: ``num_steps``, ``eta``) or ``sde`` (DiffPure's: the reverse VP-SDE
    by Euler-Maruyama from t* = ``t_star`` / N of its time with step ``dt``; the guidance adds
    to the score as it does in ε-space; ``num_steps`` and ``eta`` do not apply). Victim guidance's
    ``target`` is ``hard`` (the paper), ``soft`` (the victim's distribution sharpened by
    ``soft_temperature`` < 1; at 1 it shifts nothing and purifies as DiffPure; towards 0 it
    nears ``hard``, smoothly), or ``straight-through`` (for an attacker's copy: it purifies
    exactly as ``hard``; see ``VictimGuidance``).

    Speed options that do not change the defence: ``precision`` (autocast; ``auto`` is bf16 where
    the hardware has it natively, else fp32 on CPU and fp16 on CUDA), ``channels_last`` (NHWC
    convolutions; faster on CUDA tensor cores, no faster on this CPU; converts the diffusion
    model's weights in place) and ``compile`` (``torch.compile`` the denoiser once per process).

    ``frozen_noise`` draws the same noise at every call, per sample (see ``bind_samples``): the
    deterministic white-box threat model."""

    t_star: int | float = 100
    num_steps: int | None = 10
    eta: float = 1.0
    guidance: str = "victim"
    victim_scale: float = 3.0
    mse_scale: float = 0.5
    schedule: str = "constant"
    target: str = "hard"
    soft_temperature: float = 1.0
    guidance_through_denoiser: bool = False
    clip_x0: bool = True
    precision: str = "auto"
    channels_last: bool = False
    compile: bool = False
    batch_size: int = 256
    checkpoint_steps: bool = False
    seed: int = 0
    frozen_noise: bool = False
    sampler: str = "ddpm"
    dt: float = 1e-3

    def __post_init__(self) -> None:
        check_precision(self.precision)
        check_choice("sampler", self.sampler, SAMPLERS)
        guidance_terms(self.guidance)
        check_choice("guidance schedule", self.schedule, SCHEDULES)
        check_choice("victim guidance target", self.target, TARGETS)
        if not self.soft_temperature > 0.0:
            raise ValueError(f"soft_temperature must be positive, got {self.soft_temperature}")
        if not 0.0 < self.dt <= 1.0:
            raise ValueError(f"dt must be in (0, 1] (the SDE sampler's step in continuous time), got {self.dt}")


@dataclass
class PurificationNoise:
    """All randomness of one purification: forward noise, per-step noise, GDMP target noise."""

    forward: torch.Tensor
    steps: torch.Tensor
    targets: torch.Tensor


@dataclass
class ReverseState:
    """The sample after one reverse step (in [-1, 1]) and the ᾱ of the time it reached."""

    x: torch.Tensor
    alpha_bar: torch.Tensor


class Purifier(nn.Module):
    """Maps images in [0, 1] to purified images in [0, 1] (N x C x H x W). Fresh noise comes
    from ``noise_generator`` (seeded by ``config.seed``), whose state an interrupted attack
    saves to resume with the same draws."""

    def __init__(self, diffusion: NoisePredictor, config: PurifierConfig | None = None,
                 victim: nn.Module | None = None, guidance: Guidance | None = None) -> None:
        super().__init__()
        self.config = config or PurifierConfig()
        self.diffusion = diffusion.eval().requires_grad_(False)
        if self.config.channels_last:
            self.diffusion.to(memory_format=torch.channels_last)
        self.guidance_victim = victim
        self._custom_guidance = guidance is not None
        self.guidance = guidance if guidance is not None else build_guidance(
            self.config.guidance, victim, victim_scale=self.config.victim_scale,
            mse_scale=self.config.mse_scale, schedule=self.config.schedule,
            target=self.config.target, soft_temperature=self.config.soft_temperature,
            precision=self.config.precision)
        self.t_star = resolve_t_star(self.config.t_star, diffusion.num_train_timesteps)
        # the steps' start times: integer steps (ddpm), or times of the SDE in (0, 1] (sde)
        self.sde = diffusion.sde if self.config.sampler == "sde" else None
        t_star_time = self.t_star / diffusion.num_train_timesteps
        self.timesteps = (reverse_sde_times(t_star_time, self.config.dt) if self.sde is not None
                          else reverse_timesteps(self.t_star, self.config.num_steps))
        self.noise_generator = torch.Generator().manual_seed(self.config.seed)
        self._variants = 0
        self._samples: tuple[torch.Tensor, list[int]] | None = None
        self._trajectories: list[list[ReverseState]] | None = None

    @property
    def stochastic(self) -> bool:
        """Whether two calls on the same images may differ (fresh noise each call)."""
        return not self.config.frozen_noise

    def variant(self, **overrides) -> "Purifier":
        """The same defence with some settings changed (e.g. checkpointing for an attack, fewer
        steps for a surrogate); shares the diffusion model and the victim.

        Without an explicit ``seed`` a fresh-noise variant gets a noise stream of its own
        (derived from this purifier's seed and a counter), so that an attacker's copy never
        replays the draws of the purifier that scores it; a frozen-noise variant keeps its
        noise, which is part of the defence it copies (and so does its sample binding)."""
        if "seed" not in overrides and not replace(self.config, **overrides).frozen_noise:
            self._variants += 1
            overrides["seed"] = derive_seed(self.config.seed, "variant", self._variants)
        variant = Purifier(self.diffusion, replace(self.config, **overrides), self.guidance_victim,
                           self._guidance_for(overrides))
        variant._samples = self._samples if variant.config.seed == self.config.seed else None
        return variant

    def _guidance_for(self, overrides: dict) -> Guidance | None:
        """The guidance object of a variant with ``overrides``: this purifier's custom one unless
        the variant asks for guidance settings of its own; then none where it asks for no
        guidance, and else a refusal (a custom object cannot be rebuilt with another target or
        scale, and keeping it would silently give an attacker's surrogate the guidance it asked
        to change)."""
        asked = [name for name in GUIDANCE_SETTINGS if name in overrides]
        if not self._custom_guidance or not asked:
            return self.guidance if self._custom_guidance else None
        if "guidance" in overrides and not guidance_terms(overrides["guidance"]):
            return None  # built from the settings: no guidance
        raise ValueError(f"this purifier carries a custom guidance object ({type(self.guidance).__name__}), "
                         f"which cannot be rebuilt with other {', '.join(asked)}; only guidance 'none' "
                         "can replace it (build the purifier from settings to attack it through a changed copy)")

    def bind_samples(self, originals: torch.Tensor, keys: list[int]) -> "Purifier":
        """This frozen-noise purifier with each sample's noise keyed by ``keys`` (e.g. dataset
        indices) instead of its position in a call: an input belongs to the sample whose clean
        image in ``originals`` is nearest in L∞. Adversarial examples stay in their ε-ball, so
        an attack that calls the defence on any subset or order of a batch (AutoAttack) sees
        the same noise per sample as the scorer."""
        if not self.config.frozen_noise:
            raise ValueError("bind_samples needs frozen_noise=True: fresh noise has no fixed draw to key")
        if len(originals) != len(keys):
            raise ValueError(f"{len(originals)} original images but {len(keys)} keys")
        bound = self.variant()
        bound._samples = (originals.detach().flatten(1), list(keys))
        return bound

    def reseed(self, seed: int) -> None:
        """Restart the noise stream: purifications after this are reproducible from ``seed``."""
        self.noise_generator.manual_seed(seed)

    @contextmanager
    def trajectories(self) -> Iterator[list[list[ReverseState]]]:
        """Record, for every call made inside, the state after each reverse step (all rows of
        the call): the intermediate states an attacker's loss may use (DiffAttack)."""
        self._trajectories = recorded = []
        try:
            yield recorded
        finally:
            self._trajectories = None

    def forward(self, images: torch.Tensor, noise: PurificationNoise | None = None) -> torch.Tensor:
        """Purify ``images`` in chunks of ``batch_size``; ``noise`` fixes the randomness if given.
        Any float dtype is accepted; the work and the output are in the diffusion model's dtype."""
        _check_images(images, self.diffusion)
        images = images.to(next(self.diffusion.parameters()).dtype)
        if noise is not None:
            chunks = [(images, noise)]
        elif self.config.frozen_noise:
            keys = self._sample_keys(images)
            chunks = [(chunk, self._frozen_noise(chunk.shape, keys[start:]))
                      for start, chunk in zip(range(0, len(images), self.config.batch_size),
                                              images.split(self.config.batch_size))]
        else:
            chunks = [(chunk, self.draw_noise(chunk.shape, self.noise_generator))
                      for chunk in images.split(self.config.batch_size)]
        states: list[list[ReverseState]] = []
        purified = torch.cat([self._purify(chunk, chunk_noise, states) for chunk, chunk_noise in chunks])
        if self._trajectories is not None:
            self._trajectories.append([ReverseState(torch.cat([s.x for s in step]), step[0].alpha_bar)
                                       for step in zip(*states)])
        return purified

    def _sample_keys(self, images: torch.Tensor) -> list[int]:
        """Which sample each row is: its bound key (nearest original in L∞) or its position."""
        if self._samples is None:
            return list(range(len(images)))
        originals, keys = self._samples
        nearest = torch.cdist(images.detach().flatten(1).float(), originals.to(images.device).float(),
                              p=float("inf")).argmin(1)
        return [keys[i] for i in nearest.tolist()]

    def _frozen_noise(self, shape: torch.Size, keys: list[int]) -> PurificationNoise:
        """Each sample's own fixed draw, from a generator seeded by (seed, its key)."""
        draws = [self.draw_noise((1, *shape[1:]), torch.Generator().manual_seed(
            derive_seed(self.config.seed, "frozen-sample", key))) for key in keys[: shape[0]]]
        return PurificationNoise(torch.cat([d.forward for d in draws]),
                                 torch.cat([d.steps for d in draws], dim=1),
                                 torch.cat([d.targets for d in draws], dim=1))

    def draw_noise(self, shape: torch.Size, generator: torch.Generator) -> PurificationNoise:
        """Draw every noise tensor one purification of a batch of ``shape`` needs (on CPU, so
        that the same seed gives the same noise on any device)."""
        steps = len(self.timesteps)
        has_targets = self.guidance is not None and self.guidance.uses_target_noise
        draw = lambda *dims: torch.randn(*dims, generator=generator)  # noqa: E731
        return PurificationNoise(draw(*shape), draw(steps, *shape),
                                 draw(steps, *shape) if has_targets else torch.zeros(steps, 1, 1, 1, 1))

    def _purify(self, images: torch.Tensor, noise: PurificationNoise,
                states: list[list[ReverseState]] | None = None) -> torch.Tensor:
        """One chunk's purification; while trajectories are recorded, its reverse states are
        appended to ``states``."""
        device = images.device
        x_input = images * 2.0 - 1.0
        alphas_cumprod = self.diffusion.alphas_cumprod.to(device)
        # DiffPure diffuses its SDE's start with the ᾱ of t* discrete steps, ᾱ[t* - 1]
        start = self.t_star - 1 if self.sde is not None else self.t_star
        x = forward_diffuse(x_input, alphas_cumprod[start], noise.forward.to(device))
        return self._reverse(x, x_input, noise, states)

    def reverse_from(self, x_t: torch.Tensor, x_input: torch.Tensor,
                     noise: PurificationNoise | None = None) -> torch.Tensor:
        """The reverse process alone, from ``x_t`` (in [-1, 1] model units, at the noise level of
        the first timestep, t*) to an image in [0, 1], without diffusing forward: for inputs
        that already carry their noise (denoised smoothing, ``certification.denoisers``).
        ``x_input`` is the (noisy) input in [-1, 1] that guidance may compare with. The DDPM/DDIM
        sampler only (the SDE sampler's start time is not an integer step)."""
        if self.sde is not None:
            raise ValueError("reverse_from runs the ddpm sampler only, not sampler 'sde'")
        if noise is None:
            noise = self.draw_noise(x_t.shape, self.noise_generator)
        return self._reverse(x_t, x_input, noise)

    def _reverse(self, x: torch.Tensor, x_input: torch.Tensor, noise: PurificationNoise,
                 states: list[list[ReverseState]] | None = None) -> torch.Tensor:
        """The reverse steps from x at t* (in [-1, 1]) to an image in [0, 1]."""
        device = x.device
        alphas_cumprod = self.diffusion.alphas_cumprod.to(device)
        recorded = [] if self._trajectories is not None and states is not None else None
        for index, (step, reached) in enumerate(zip(self._steps(alphas_cumprod), self._reached(alphas_cumprod))):
            progress = index / max(1, len(self.timesteps) - 1)
            step = partial(step, step_noise=noise.steps[index].to(device),
                           target_noise=noise.targets[index].to(device), progress=progress)
            if self.config.checkpoint_steps and torch.is_grad_enabled():
                x = recomputed_in_backward(step, x, x_input)
            else:
                x = step(x, x_input)
            if recorded is not None:
                recorded.append(ReverseState(x, reached))
        if recorded is not None:
            states.append(recorded)
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

    def _reached(self, alphas_cumprod: torch.Tensor) -> list[torch.Tensor]:
        """The ᾱ at the end of each reverse step (1 for the step that lands on the image)."""
        if self.sde is not None:
            return [torch.tensor(self.sde.alpha_bar(end), dtype=torch.float64, device=alphas_cumprod.device)
                    for _, end in self._spans()]
        return [step_coefficients(alphas_cumprod, t, end).alpha_bar_prev for t, end in self._spans()]

    def _steps(self, alphas_cumprod: torch.Tensor) -> Iterator[Callable[..., torch.Tensor]]:
        """The reverse steps in order, each waiting for (x_t, x_input, noises, progress)."""
        if self.sde is not None:
            return (partial(self._sde_step, t=t, dt=t - end) for t, end in self._spans())
        return (partial(self._reverse_step, t=t, c=step_coefficients(alphas_cumprod, t, t_prev))
                for t, t_prev in self._spans())

    def _spans(self) -> list[tuple]:
        """Each reverse step's (start, end): integer steps, the last ending at -1 (the image),
        or times of the SDE, the last ending at its ``T_END``."""
        return list(zip(self.timesteps, [*self.timesteps[1:], T_END if self.sde is not None else -1]))

    def _reverse_step(self, x_t: torch.Tensor, x_input: torch.Tensor, step_noise: torch.Tensor,
                      target_noise: torch.Tensor, t: int, c: StepCoefficients,
                      progress: float) -> torch.Tensor:
        eps, variance = self._guided_prediction(x_t, x_input, target_noise, t, c, progress)
        return reverse_step(x_t, eps, c, step_noise, self.config.eta, variance, self.config.clip_x0)

    def _sde_step(self, x_t: torch.Tensor, x_input: torch.Tensor, step_noise: torch.Tensor,
                  target_noise: torch.Tensor, t: float, dt: float, progress: float) -> torch.Tensor:
        """One Euler-Maruyama step of the reverse VP-SDE from t to t - dt at the network's time
        label for t (``sde_time_label``: ⌊N·t⌋ for discrete-step networks, (N-1)·t for score-SDE's),
        score -ε / std(t) with ε guided as in the ddpm steps (ᾱ of the SDE's marginal), so the
        score gains scale · ∇ log p. A learned variance goes unused, as in DiffPure."""
        alpha_bars = (torch.tensor(self.sde.alpha_bar(s), dtype=torch.float64, device=x_t.device)
                      for s in (t, t - dt))
        label = self.diffusion.sde_time_label(t)
        eps, _ = self._guided_prediction(x_t, x_input, target_noise, label, StepCoefficients(*alpha_bars),
                                         progress)
        return reverse_sde_step(x_t, -eps / self.sde.std(t), self.sde, t, dt, math.sqrt(dt) * step_noise)

    def _guided_prediction(self, x_t: torch.Tensor, x_input: torch.Tensor, target_noise: torch.Tensor,
                           t: int | float, c: StepCoefficients, progress: float
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ε, learned variance or None) with the guidance shift applied to ε.

        When gradients to the input are wanted (an attack), the shift is built with
        ``create_graph`` so the attacker differentiates through it too.
        """
        if self.guidance is None:
            return self._denoise(x_t, t)
        differentiable = torch.is_grad_enabled() and x_t.requires_grad
        through_denoiser = self.config.guidance_through_denoiser
        with torch.enable_grad():
            x_view = x_t.clone() if differentiable else x_t.detach().requires_grad_(True)
            with torch.set_grad_enabled(differentiable or through_denoiser):
                eps, variance = self._denoise(x_view if through_denoiser else x_t, t)
            x0_hat = predict_x0(x_view, eps, c.alpha_bar, self.config.clip_x0)
            state = GuidanceState(x_view, x0_hat, x_input, c.alpha_bar, progress, target_noise)
            gradient = self.guidance.gradient(state, create_graph=differentiable)
        guided = eps - (1.0 - c.alpha_bar).sqrt() * gradient
        return (guided, variance) if differentiable else (guided.detach(), variance)

    def _denoise(self, x_t: torch.Tensor, t: int | float) -> tuple[torch.Tensor, torch.Tensor | None]:
        timestep = torch.full((x_t.shape[0],), t, device=x_t.device)  # int64 steps, float32 labels
        if self.config.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with autocast(x_t.device, self.config.precision):
            output = (_compiled(self.diffusion) if self.config.compile else self.diffusion)(x_t, timestep)
        output = output.to(x_t.dtype).contiguous()
        channels = self.diffusion.image_channels
        if self.diffusion.learned_variance:
            return output[:, :channels], output[:, channels:]
        return output, None


def _compiled(diffusion: NoisePredictor) -> nn.Module:
    """``torch.compile(diffusion)``, made once and kept on the model (outside its submodules, so
    state dicts are unchanged) so that every purifier variant shares the compiled code."""
    if "_compiled" not in diffusion.__dict__:
        object.__setattr__(diffusion, "_compiled", torch.compile(diffusion))
    return diffusion.__dict__["_compiled"]


def _check_images(images: torch.Tensor, diffusion: NoisePredictor) -> None:
    """Refuse inputs the diffusion model cannot purify, naming what is wrong."""
    check_unit_images(images)
    if images.ndim != 4:
        raise ValueError(f"expected images of shape N x C x H x W, got {tuple(images.shape)}")
    if images.shape[1] != diffusion.image_channels:
        raise ValueError(f"images have {images.shape[1]} channels; the diffusion model "
                         f"expects {diffusion.image_channels}")
    size = diffusion.sample_size
    if tuple(images.shape[2:]) != (size, size):
        raise ValueError(f"images are {images.shape[2]}x{images.shape[3]}; the diffusion model "
                         f"works at {size}x{size} (resize or crop first)")
