"""Precision chosen from the hardware: the resolver with the bf16 probe faked both ways.

No test here depends on bfloat16 being fast, or on this machine having it.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import make_tiny_images
from distpure import devices
from distpure.defenses.purifier import Purifier, PurifierConfig
from distpure.devices import (NATIVE_BF16_ENV, autocast, describe_hardware, hardware, native_bf16,
                              resolve_precision)
from distpure.evaluation.config import ExperimentConfig
from distpure.training.diffusion import DiffusionTrainingConfig


@pytest.fixture
def fake_probe(monkeypatch: pytest.MonkeyPatch):
    """``fake_probe(native)`` makes every device report native bf16 or not (no env override)."""
    monkeypatch.delenv(NATIVE_BF16_ENV, raising=False)

    def set_answer(native: bool) -> None:
        monkeypatch.setattr(devices, "_probe_native_bf16", lambda device_type, index: native)
    return set_answer


@pytest.mark.parametrize("native, cpu, cuda", [(True, "bf16", "bf16"), (False, "fp32", "fp16")])
def test_auto_resolves_from_the_hardware(fake_probe, native, cpu, cuda):
    fake_probe(native)
    assert resolve_precision("auto", "cpu") == cpu
    assert resolve_precision("auto", torch.device("cuda", 0)) == cuda
    assert resolve_precision("auto", "meta") == "fp32"  # any other device


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("explicit", ["fp32", "bf16", "fp16"])
def test_explicit_precisions_mean_exactly_that(fake_probe, native, explicit):
    fake_probe(native)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert resolve_precision(explicit, "cpu") == explicit
        assert resolve_precision(explicit, "cuda") == explicit


def test_unknown_precision_names_the_choices():
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16.*'half'"):
        resolve_precision("half", "cpu")
    for build in (lambda: PurifierConfig(precision="bf61"), lambda: DiffusionTrainingConfig(precision="x"),
                  lambda: ExperimentConfig(precision="float32", defenses=[{"name": "d", "kind": "none"}],
                                           attacks=[{"name": "a", "kind": "clean"}])):
        with pytest.raises(ValueError, match="precision must be one of"):
            build()


def test_explicit_bf16_on_an_emulating_cpu_warns_once(fake_probe):
    fake_probe(False)
    devices._warn_emulated_bf16.cache_clear()
    with pytest.warns(RuntimeWarning, match=r"emulated, about 45x slower.*'auto' \(or 'fp32'\)"):
        resolve_precision("bf16", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_precision("bf16", "cpu")  # the second time is silent
    fake_probe(True)
    devices._warn_emulated_bf16.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_precision("bf16", "cpu")  # native: nothing to say


def test_environment_override_beats_the_probe(fake_probe, monkeypatch):
    fake_probe(True)
    monkeypatch.setenv(NATIVE_BF16_ENV, "0")
    assert not native_bf16("cpu") and resolve_precision("auto", "cpu") == "fp32"
    fake_probe(False)
    monkeypatch.setenv(NATIVE_BF16_ENV, "1")
    assert native_bf16("cpu") and resolve_precision("auto", "cpu") == "bf16"


@pytest.mark.parametrize("native, dtype", [(True, torch.bfloat16), (False, None)])
def test_autocast_context_follows_the_resolution(fake_probe, native, dtype):
    fake_probe(native)
    with autocast("cpu", "auto"):
        assert torch.is_autocast_enabled("cpu") == (dtype is not None)
        if dtype is not None:
            assert torch.get_autocast_dtype("cpu") == dtype


@pytest.mark.parametrize("native", [True, False])
def test_default_purifier_runs_the_denoiser_at_the_resolved_precision(fake_probe, tiny_diffusion,
                                                                      tiny_victim, native):
    """The regression behind the issue: the default path must not autocast to emulated bf16."""
    fake_probe(native)
    seen: list[bool] = []
    tiny_diffusion.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    purifier = Purifier(tiny_diffusion, PurifierConfig(t_star=20, num_steps=2), victim=tiny_victim)
    with torch.no_grad():
        purifier(make_tiny_images())
    assert seen == [native, native]


def test_hardware_names_what_produced_a_figure(fake_probe):
    fake_probe(False)
    info = hardware("cpu")
    assert info["resolved_precision"] == "fp32" and info["native_bf16"] is False
    assert info["cpu"] and set(info["cpu_flags"]) <= set(devices.CPU_PRECISION_FLAGS)
    line = describe_hardware(info)
    assert line.startswith("precision fp32 (auto) on cpu: ") and info["cpu"] in line
    assert "no native bf16" in line


@pytest.mark.parametrize("native, device, scaled", [(False, "cuda", True), (True, "cuda", False),
                                                    (False, "cpu", False)])
def test_float16_training_scales_its_loss(fake_probe, native, device, scaled):
    from distpure.training.loop import needs_loss_scaling

    fake_probe(native)
    assert needs_loss_scaling(torch.device(device), "auto") == scaled
    assert needs_loss_scaling(torch.device(device), "fp32") is False
