"""Property-based tests: random shapes, dtypes, values, image modes and configuration keys give
either a valid result or a ValueError / TypeError that names the problem, never anything else."""
from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from distpure.attacks.pgd import PGDConfig, pgd
from distpure.config import from_dict, merge, parse_overrides
from distpure.data import read_image
from distpure.defenses.purifier import Purifier, PurifierConfig
from distpure.evaluation.config import ExperimentConfig

from conftest import TINY_SIZE, make_tiny_diffusion, make_tiny_victim

FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int64, torch.bool]
VALUES = ["unit", "zeros-and-ones", "above-one", "negative", "nan", "inf"]


@lru_cache(maxsize=None)
def tiny_purifier() -> Purifier:
    """One victim-guided step from t* = 10 on the tiny 16 x 16 model (shared by all examples)."""
    config = PurifierConfig(t_star=10, num_steps=1, guidance="victim", precision="fp32")
    return Purifier(make_tiny_diffusion(), config, victim=make_tiny_victim())


def _values(shape: tuple[int, ...], kind: str, seed: int) -> torch.Tensor:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if kind == "zeros-and-ones":
        return x.round()
    if kind == "above-one":
        return 1.01 + x
    if kind == "negative":
        return -0.01 - x
    if kind in ("nan", "inf") and x.numel():
        x.view(-1)[seed % x.numel()] = float(kind)
    return x


@FEW
@given(shape=st.one_of(st.sampled_from([(1, 3, TINY_SIZE, TINY_SIZE), (2, 3, TINY_SIZE, TINY_SIZE)]),
                       st.tuples(st.integers(0, 2), st.sampled_from([1, 3, 4]),
                                 st.sampled_from([8, TINY_SIZE]), st.sampled_from([8, TINY_SIZE])),
                       st.lists(st.integers(1, 3), min_size=1, max_size=5).map(tuple)),
       dtype=st.one_of(st.just(torch.float32), st.sampled_from(DTYPES)),
       kind=st.one_of(st.just("unit"), st.sampled_from(VALUES)), seed=st.integers(0, 2**16))
@example(shape=(2, 3, TINY_SIZE, TINY_SIZE), dtype=torch.float32, kind="unit", seed=0)
@example(shape=(1, 3, TINY_SIZE, TINY_SIZE), dtype=torch.bfloat16, kind="zeros-and-ones", seed=0)
@example(shape=(1, 3, TINY_SIZE, TINY_SIZE), dtype=torch.float64, kind="unit", seed=0)
@example(shape=(0, 3, TINY_SIZE, TINY_SIZE), dtype=torch.float32, kind="unit", seed=0)
def test_purifier_purifies_or_refuses(shape, dtype, kind, seed):
    images = _values(shape, kind, seed).to(dtype)
    valid = (len(shape) == 4 and shape[0] > 0 and shape[1:] == (3, TINY_SIZE, TINY_SIZE)
             and dtype.is_floating_point and kind in ("unit", "zeros-and-ones"))
    try:
        with torch.no_grad():
            output = tiny_purifier()(images)
    except (ValueError, TypeError) as error:
        assert not valid, f"a valid input was refused: {error}"
        assert str(error)
        event("refused")
        return
    event("purified")
    assert valid, f"an invalid input {tuple(shape)} {dtype} {kind} was purified"
    assert output.shape == images.shape and output.dtype == torch.float32
    assert torch.isfinite(output).all() and output.min() >= 0 and output.max() <= 1


@FEW
@given(n=st.integers(1, 3), norm=st.sampled_from(["linf", "l2"]), eps=st.floats(0.0, 0.5),
       steps=st.integers(0, 3), random_start=st.booleans(), keep_best=st.booleans(),
       loss=st.sampled_from(["ce", "margin"]), kind=st.sampled_from(["unit", "zeros-and-ones"]),
       warm_start=st.booleans(), momentum=st.sampled_from([0.0, 0.9]), seed=st.integers(0, 2**16))
def test_pgd_stays_in_the_ball_and_the_box(n, norm, eps, steps, random_start, keep_best, loss, kind,
                                           warm_start, momentum, seed):
    images = _values((n, 3, 8, 8), kind, seed).float()
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed))
    config = PGDConfig(norm=norm, eps=eps, steps=steps, random_start=random_start,
                       keep_best=keep_best, loss=loss, momentum=momentum, seed=seed)
    start = torch.rand(images.shape, generator=torch.Generator().manual_seed(seed)) if warm_start else None
    adversarial = pgd(_victim(), images, labels, config, start=start)
    delta = (adversarial - images).flatten(1)
    assert adversarial.shape == images.shape
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-5) + 1e-6).all(), (size, eps)


def test_pgd_warm_start_is_the_first_iterate_projected_into_the_ball():
    images = torch.full((2, 3, 8, 8), 0.5)
    start = images + torch.tensor([0.1, -0.01]).view(2, 1, 1, 1)
    labels = torch.tensor([0, 1])
    adversarial = pgd(_victim(), images, labels, PGDConfig(eps=0.05, steps=0), start=start)
    assert torch.allclose(adversarial[0], images[0] + 0.05) and torch.allclose(adversarial[1], start[1])


@lru_cache(maxsize=None)
def _victim() -> torch.nn.Module:
    return make_tiny_victim()


# PIL mode -> (file format, whether 8-bit RGB values survive exactly)
MODES = {"1": ("PNG", True), "L": ("PNG", True), "LA": ("PNG", True), "P": ("PNG", True),
         "RGB": ("PNG", True), "RGBA": ("PNG", True), "I;16": ("PNG", True), "I": ("TIFF", False),
         "F": ("TIFF", False), "CMYK": ("JPEG", False), "YCbCr": ("JPEG", False)}


def _image(mode: str, array: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """A PIL image of ``mode`` from random uint8 RGB pixels, and the RGB it should read back as."""
    rgb = Image.fromarray(array)
    if mode == "I;16":
        deep = array[..., 0].astype(np.uint16) * 257
        return Image.fromarray(deep), np.repeat(array[..., :1], 3, axis=2)
    if mode == "P":
        image = rgb.quantize(8)
        return image, np.asarray(image.convert("RGB"))
    image = rgb.convert(mode)
    return image, np.asarray(image.convert("RGB"))


@FEW
@given(mode=st.sampled_from(sorted(MODES)), height=st.integers(1, 9), width=st.integers(1, 9),
       seed=st.integers(0, 2**16))
def test_read_image_of_any_mode_is_rgb_in_unit_range(tmp_path_factory, mode, height, width, seed):
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image, expected = _image(mode, array)
    fmt, exact = MODES[mode]
    path = tmp_path_factory.mktemp("modes") / f"image.{fmt.lower()}"
    image.save(path, fmt)
    tensor = read_image(path)
    assert tensor.shape == (3, height, width) and tensor.dtype == torch.float32
    assert torch.isfinite(tensor).all() and tensor.min() >= 0 and tensor.max() <= 1
    if exact:
        torch.testing.assert_close(tensor, torch.from_numpy(expected.copy()).permute(2, 0, 1) / 255.0)


BASE = {"defenses": [{"name": "none", "kind": "none"}], "attacks": [{"name": "clean", "kind": "clean"}]}
# key parts: real section and field names (so some overrides are valid), and junk
PARTS = st.one_of(st.sampled_from(["data", "models", "limit", "root", "seed", "batch_size", "name",
                                   "victim", "paper", "defenses", "attacks", "t_star"]),
                  st.text("abz_ -", min_size=0, max_size=5))
VALUE_TEXT = st.sampled_from(["1", "x", "[1, 2]", "{a: 1}", "null", "", "[", "a: b: c", "'"])


def names_an_override(message: str, pairs: list[str]) -> bool:
    """Whether ``message`` names one of the overrides: the pair itself, or a part of its key
    written as a setting is ('x', .x, ``x;`` in a list of fields, ``sub-keys x``), not a word of
    the prose around it."""
    parts = {part for pair in pairs for part in pair.split("=", 1)[0].strip().split(".") if part}
    return any(repr(pair) in message for pair in pairs) or any(
        re.search(rf"(?:^|'|\.|: |, |sub-keys ){re.escape(part)}(?:'|;|,|:|\)| |$)", message)
        for part in parts)


@FEW
@given(keys=st.lists(st.one_of(st.sampled_from(["seed", "name", "data.limit", "models.victim", "paper.x"]),
                               st.lists(PARTS, min_size=1, max_size=3).map(".".join)),
                     min_size=1, max_size=3),
       values=st.lists(VALUE_TEXT, min_size=3, max_size=3), equals=st.sampled_from([True, True, True, False]))
@example(keys=["defenses"], values=["[1, 2]", "1", "1"], equals=True)
@example(keys=["seed"], values=["x", "1", "1"], equals=True)
@example(keys=["data.limit"], values=["[1, 2]", "1", "1"], equals=True)
@example(keys=["attacks.clean.kind"], values=["x", "1", "1"], equals=True)
def test_overrides_build_a_config_or_name_the_bad_key(keys, values, equals):
    pairs = [f"{key}={value}" if equals else key for key, value in zip(keys, values)]
    try:
        config = from_dict(ExperimentConfig, merge(BASE, parse_overrides(pairs)))
    except ValueError as error:
        assert names_an_override(str(error), pairs), (pairs, str(error))
        event("refused")
        return
    event("built")
    assert isinstance(config, ExperimentConfig)


@FEW
@given(key=st.one_of(st.text(max_size=6), st.integers(), st.none(), st.booleans(), st.floats()),
       value=st.one_of(st.integers(), st.text(max_size=3),
                       st.dictionaries(st.text(max_size=2), st.integers())))
def test_unknown_keys_are_named(key, value):
    fields = set(PurifierConfig.__dataclass_fields__)
    if key in fields:
        return
    with pytest.raises(ValueError, match="unknown PurifierConfig field") as error:
        from_dict(PurifierConfig, {"t_star": 10, key: value})
    assert str(key) in str(error.value)


def test_config_shape_errors_name_the_setting():
    """The cases the properties above found, made explicit."""
    with pytest.raises(ValueError, match="'seed' already has a value"):
        parse_overrides(["seed=1", "seed.x=2"])
    with pytest.raises(ValueError, match="empty key"):
        parse_overrides(["data..limit=2"])
    with pytest.raises(ValueError, match="not valid YAML"):
        parse_overrides(["limit=["])
    with pytest.raises(ValueError, match=r"PurifierConfig.seed is a single setting.*sub-keys x"):
        from_dict(PurifierConfig, parse_overrides(["seed.x=1"]))
    with pytest.raises(ValueError, match="ExperimentConfig.data is a section: expected a mapping, got 3"):
        from_dict(ExperimentConfig, merge(BASE, {"data": 3}))
    with pytest.raises(ValueError, match=r"ExperimentConfig.defenses is a list.*got 1"):
        from_dict(ExperimentConfig, merge(BASE, {"defenses": 1}))
    with pytest.raises(ValueError, match="unknown PurifierConfig field.*1, None"):
        from_dict(PurifierConfig, {1: 0, None: 0})
    with pytest.raises(ValueError, match="expected a mapping of settings"):
        from_dict(PurifierConfig, [1, 2])
