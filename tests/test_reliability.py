"""Reliability and security: bad input is converted or refused clearly before long work,
hostile checkpoints are refused, killed training runs resume bit-identically, and purification
is deterministic.

Covered elsewhere, not repeated here: image modes, truncated / garbage files and empty folders
for ``read_image`` / ``load_image_folder`` (test_data.py), the Purifier's refusal of bad tensors
(test_purifier.py::test_invalid_images_are_refused), same seed -> bit-identical Purifier output
(test_purifier.py::test_same_seed_same_output), a malicious pickle through ``load_state_dict``
(test_models.py), and a SIGKILLed evaluation resuming to identical results files
(test_evaluation.py::test_killed_run_resumes_to_identical_results).
"""
from __future__ import annotations

import ast
import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from distpure.attacks.pgd import PGDConfig, pgd
from distpure.cli.main import main
from distpure.data import read_image
from distpure.defenses.defended import DefendedClassifier
from distpure.defenses.purifier import Purifier, PurifierConfig
from distpure.evaluation.rundir import ProgressFile
from distpure.models.classifiers import load_classifier
from distpure.models.diffusion import DiffusionModel
from distpure.models.diffusion_loader import load_diffusion
from distpure.models.weights import UnsafeCheckpointError, save_state_dict
from distpure.training.checkpoint import load_if_exists

from conftest import make_tiny_diffusion, make_tiny_images, make_tiny_victim

SRC = Path(__file__).resolve().parents[1] / "src" / "distpure"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _png(path: Path, array: np.ndarray, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **options)
    return path


def _rgb(size: int = 32, seed: int = 0, width: int | None = None) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, width or size, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- image files

def test_16_bit_grayscale_is_rescaled(tmp_path):
    levels = np.array([[0, 32768, 65535]], dtype=np.uint16)
    tensor = read_image(_png(tmp_path / "deep.png", levels))
    assert tensor.shape == (3, 1, 3)
    expected = torch.tensor([0.0, round(32768 / 65535 * 255) / 255, 1.0])
    for channel in tensor:
        torch.testing.assert_close(channel[0], expected)


@pytest.fixture(scope="module")
def purify_folder_input(tmp_path_factory) -> SimpleNamespace:
    """A folder of good images in every mode, plus corrupt, truncated, wrong-size and clashing files."""
    root = tmp_path_factory.mktemp("purify-in")
    good = {"cats/a.png": _png(root / "cats/a.png", _rgb(seed=1)),
            "cats/b.png": _png(root / "cats/b.jpg", _rgb(seed=2), quality=95),
            "gray.png": _png(root / "gray.png", _rgb(seed=3)[..., 0]),
            "rgba.png": _png(root / "rgba.png", np.dstack([_rgb(seed=4), _rgb(seed=5)[..., :1]])),
            "deep.png": _png(root / "deep.png", (_rgb(seed=6)[..., 0].astype(np.uint16) * 257)),
            "clash.png": _png(root / "clash.jpg", _rgb(seed=7))}
    Image.fromarray(_rgb(seed=8)).quantize(16).save(root / "palette.png")
    good["palette.png"] = root / "palette.png"
    _png(root / "clash.png", _rgb(seed=9))  # would overwrite clash.jpg's output
    (root / "bad").mkdir()
    (root / "bad/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    jpeg = _png(root / "bad/truncated.jpg", _rgb(seed=10), quality=95).read_bytes()
    (root / "bad/truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    _png(root / "big.png", _rgb(40, seed=11, width=48))
    (root / "notes.txt").write_text("not an image: ignored")
    bad = {"clash.png": "already the output of", "bad/corrupt.png": "not a readable image",
           "bad/truncated.jpg": "truncated", "big.png": "48x40, the model works at 32x32 (use --resize)"}
    return SimpleNamespace(root=root, good=good, bad=bad)


def _purify_cli(*args: str) -> tuple[int, str]:
    """``distpure purify ...`` with the embedded defence (2 reverse steps), and its stderr."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["purify", *args, "--device", "cpu", "--set", "num_steps=2"])
    return code, stderr.getvalue()


@pytest.fixture(scope="module")
def purified(purify_folder_input, tmp_path_factory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("purify-out")
    code, stderr = _purify_cli(str(purify_folder_input.root), str(out))
    return SimpleNamespace(out=out, code=code, stderr=stderr)


def test_purify_writes_good_files_and_lists_bad_ones(purify_folder_input, purified):
    assert purified.code == 1, purified.stderr
    written = sorted(str(p.relative_to(purified.out)) for p in purified.out.rglob("*") if p.is_file())
    assert written == sorted(purify_folder_input.good)
    for name in written:
        with Image.open(purified.out / name) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
    skipped = [line for line in purified.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == len(purify_folder_input.bad), purified.stderr
    for name, reason in purify_folder_input.bad.items():
        assert any(f"{purify_folder_input.root / name}: " in line and reason in line for line in skipped), \
            f"{name} ({reason}) not reported:\n{purified.stderr}"
    assert "notes.txt" not in purified.stderr


def test_purify_is_deterministic(purify_folder_input, purified, tmp_path):
    """Same command, same seed, same thread count: byte-identical PNGs."""
    code, _ = _purify_cli(str(purify_folder_input.root), str(tmp_path))
    assert code == 1
    for name in purify_folder_input.good:
        assert (tmp_path / name).read_bytes() == (purified.out / name).read_bytes(), name


def test_purify_resize_accepts_wrong_size(tmp_path):
    _png(tmp_path / "in/big.png", _rgb(40, width=48))
    code, stderr = _purify_cli(str(tmp_path / "in"), str(tmp_path / "out"), "--resize")
    assert code == 0, stderr
    with Image.open(tmp_path / "out/big.png") as image:
        assert image.size == (32, 32)


@pytest.mark.parametrize("files, settings, message", [
    ([], [], "contains no image files"),
    (None, [], "no such directory"),
    (["a.png"], ["tstar=3"], "unknown PurifierConfig field(s): tstar"),
    (["a.png"], ["seed.value=3"], "PurifierConfig.seed is a single setting, not a section"),
], ids=["empty-folder", "missing-folder", "unknown-setting", "setting-as-section"])
def test_purify_refuses_before_loading_models(tmp_path, monkeypatch, files, settings, message):
    import distpure.defenses.recommended as recommended

    def no_models(*args, **kwargs):
        raise AssertionError("models were loaded")

    monkeypatch.setattr(recommended, "load_classifier", no_models)
    monkeypatch.setattr(recommended, "load_diffusion", no_models)
    if files is not None:
        (tmp_path / "in").mkdir()
        for name in files:
            _png(tmp_path / "in" / name, _rgb())
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["purify", str(tmp_path / "in"), str(tmp_path / "out"),
                     "--set", "num_steps=2", *settings])
    assert code == 2
    assert message in stderr.getvalue()
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- tensors

def test_purifier_refuses_empty_batch_and_converts_float_dtypes(tiny_diffusion, tiny_images):
    purifier = Purifier(tiny_diffusion, PurifierConfig(t_star=10, num_steps=1, guidance="none"))
    with pytest.raises(ValueError, match="empty"):
        purifier(tiny_images[:0])
    with torch.no_grad():
        reference = purifier.variant(seed=0)(tiny_images)
        for dtype in (torch.float64, torch.float16, torch.bfloat16):
            output = purifier.variant(seed=0)(tiny_images.to(dtype))
            assert output.dtype == torch.float32 and output.shape == tiny_images.shape
        assert reference.min() >= 0 and reference.max() <= 1
        assert torch.equal(purifier.variant(seed=0)(tiny_images.double()), reference)


@pytest.mark.parametrize("images, labels, error, message", [
    (lambda x: x * 2, lambda y: y, ValueError, r"\[0, 1\]"),
    (lambda x: x - 1, lambda y: y, ValueError, r"\[0, 1\]"),
    (lambda x: x.masked_fill(x > 0.5, float("nan")), lambda y: y, ValueError, "NaN"),
    (lambda x: (x * 255).to(torch.uint8), lambda y: y, TypeError, "dtype torch.uint8"),
    (lambda x: x, lambda y: y + 10, ValueError, r"labels must lie in \[0, 10\).*\[13, 19\]"),
    (lambda x: x, lambda y: y - 10, ValueError, r"labels must lie in \[0, 10\)"),
    (lambda x: x, lambda y: y.float(), TypeError, "integer class labels"),
    (lambda x: x, lambda y: y[:1], ValueError, "expected 2 labels"),
], ids=["above-one", "negative", "nan", "uint8", "label-too-big", "label-negative", "float-labels",
        "label-count"])
def test_pgd_refuses_bad_images_and_labels(tiny_victim, tiny_images, images, labels, error, message):
    y = torch.tensor([3, 9])
    with pytest.raises(error, match=message):
        pgd(tiny_victim, images(tiny_images), labels(y), PGDConfig(steps=1))


def test_defended_classifier_refuses_images_outside_unit_range(tiny_victim, tiny_images):
    DefendedClassifier(tiny_victim, None)(tiny_images)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        DefendedClassifier(tiny_victim, None)(tiny_images * 255)


# ----------------------------------------------------------------------------- evaluation

@pytest.fixture(scope="module")
def eval_assets(tmp_path_factory) -> SimpleNamespace:
    """A 10-output victim (random cifar10-small-resnet weights) and a 16 x 16 diffusion model."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    save_state_dict(load_classifier("cifar10-small-resnet"), root / "victim.safetensors")
    make_tiny_diffusion().save_pretrained(root / "diffusion16")
    return SimpleNamespace(root=root)


def _class_folders(root: Path, classes: int, size: int = 32, odd: str | None = None) -> Path:
    for label in range(classes):
        _png(root / "test" / f"class{label:02d}" / "0.png", _rgb(size, seed=label))
    if odd:
        _png(root / "test" / "class00" / odd, _rgb(size + 8, seed=99))
    return root


def _evaluate(assets: SimpleNamespace, data: Path, tmp_path: Path) -> tuple[int, str, Path]:
    config = {"name": "bad-input", "data": {"dataset": "cifar10", "root": str(data), "limit": None},
              "models": {"victim": str(assets.root / "victim.safetensors"),
                         "victim_arch": "cifar10-small-resnet",
                         "diffusion": str(assets.root / "diffusion16")},
              "defenses": [{"name": "none", "kind": "none"},
                           {"name": "purified", "purifier": {"t_star": 10, "num_steps": 1}}],
              "attacks": [{"name": "clean", "kind": "clean"}], "device": "cpu", "batch_size": 4}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["evaluate", str(tmp_path / "config.yaml"), "--out", str(tmp_path / "run")])
    return code, stderr.getvalue(), tmp_path / "run"


def test_evaluate_refuses_labels_beyond_the_classifier_outputs(eval_assets, tmp_path):
    code, stderr, run = _evaluate(eval_assets, _class_folders(tmp_path / "data", 11), tmp_path)
    assert code == 2
    assert "has 10 outputs but the cifar10 data has 11 classes" in stderr
    assert str(eval_assets.root / "victim.safetensors") in stderr
    assert not (run / "results.jsonl").exists()


def test_evaluate_refuses_a_diffusion_model_of_another_resolution(eval_assets, tmp_path):
    code, stderr, run = _evaluate(eval_assets, _class_folders(tmp_path / "data", 10), tmp_path)
    assert code == 2
    assert "works on 3 x 16x16 images but the cifar10 images are 3 x 32x32" in stderr
    assert not (run / "results.jsonl").exists()  # refused before the first batch


def test_evaluate_names_the_image_of_another_size(eval_assets, tmp_path):
    code, stderr, run = _evaluate(eval_assets, _class_folders(tmp_path / "data", 10, odd="odd.png"), tmp_path)
    assert code == 2
    assert "odd.png: image is 40x40" in stderr
    assert not (run / "results.jsonl").exists()


# ----------------------------------------------------------------------------- memory

LOAD_PEAK = """
import sys
from distpure.data import load_image_folder

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # reset the peak (VmHWM) to the current resident set
resident = kib("VmRSS:")
data = load_image_folder(sys.argv[1])
print((kib("VmHWM:") - resident) * 1024 / (data.images.numel() * 4))
"""


def test_image_folder_loads_without_a_second_copy(tmp_path):
    """Peak memory growth while loading is about one copy of the float data (1.27x measured for
    3,000 32x32 images; a list of tensors then torch.stack gave 2.3x)."""
    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    for i in range(3000):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a" / f"{i}.png")
    result = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(tmp_path)], env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 1.7


def test_peak_rss_of_a_child():
    from distpure.benchmarks.memory import peak_rss_mib

    touch_300_mib = "x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096])"
    assert peak_rss_mib([sys.executable, "-c", touch_300_mib]) > 300
    with pytest.raises(RuntimeError, match="failed"):
        peak_rss_mib([sys.executable, "-c", "raise SystemExit(3)"])


# ----------------------------------------------------------------------------- hostile files

class _Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _hostile(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(2), "payload": _Payload(f"touch {marker}")}, path)
    return path


def test_the_payload_is_live(tmp_path):
    """Control: unrestricted unpickling of the file below does run the command."""
    marker = tmp_path / "pwned"
    torch.load(_hostile(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("load", [
    lambda path: load_classifier(str(path), arch="cifar10-small-resnet"),
    lambda path: load_diffusion(path),  # a .pt file is read as a guided-diffusion (ADM) checkpoint
    lambda path: load_if_exists(path),
], ids=["classifier", "adm-diffusion", "training-checkpoint"])
def test_hostile_pickle_is_refused(tmp_path, load):
    marker = tmp_path / "pwned"
    path = _hostile(tmp_path / "checkpoint.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match="refused to load.*GLOBAL posix.system") as error:
        load(path)
    assert str(path) in str(error.value)
    assert not marker.exists()


def test_resuming_from_a_hostile_training_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _hostile(tmp_path / "out/checkpoint.pt", marker)
    data = _class_folders(tmp_path / "data", 2)
    (data / "train").symlink_to(data / "test")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["train-diffusion", "--set", f"data_root={data}", f"output_dir={tmp_path / 'out'}",
                     "steps=1", "channels=[32,32]", "batch_size=2", "device=cpu"])
    assert code == 2 and "checkpoint.pt: refused to load" in stderr.getvalue()
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    calls = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "load" and getattr(node.func.value, "id", None) == "torch":
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                           for k in node.keywords)
                calls.append((f"{path.relative_to(SRC)}:{node.lineno}", safe))
    assert calls, "no torch.load found: the scan is broken"
    assert [where for where, safe in calls if not safe] == []


def test_garbage_and_torn_checkpoints(tmp_path):
    path = tmp_path / "checkpoint.pt"
    (tmp_path / "checkpoint.pt.tmp").write_bytes(os.urandom(256))  # a save killed mid-write
    assert load_if_exists(path) is None
    torch.save({"step": 3, "model": {"w": torch.zeros(100)}}, path)
    complete = path.read_bytes()
    rng = np.random.default_rng(0)
    garbage = [rng.bytes(n) for n in (1, 7, 64, 256, 4096) for _ in range(4)]
    valid_pickle = b"\x80\x02N."  # unpickles to None
    for content in [complete[: len(complete) // 2], b"PK\x03\x04" + rng.bytes(100), valid_pickle, *garbage]:
        path.write_bytes(content)
        with pytest.raises(ValueError, match="checkpoint.pt: "):
            load_if_exists(path)


@pytest.fixture
def saved_diffusion(tmp_path, tiny_diffusion) -> Path:
    tiny_diffusion.save_pretrained(tmp_path / "outside")
    return tmp_path / "outside"


def test_diffusion_weights_linked_outside_the_directory_are_refused(tmp_path, saved_diffusion):
    model = tmp_path / "model"
    model.mkdir()
    for file in saved_diffusion.iterdir():
        (model / file.name).symlink_to(file)
    with pytest.raises(ValueError, match="outside the model directory"):
        DiffusionModel.from_pretrained(model)
    with pytest.raises(ValueError, match="outside the model directory"):
        load_diffusion(model)
    (tmp_path / "named-link").symlink_to(saved_diffusion)  # naming a link to a directory is fine
    assert isinstance(load_diffusion(tmp_path / "named-link"), DiffusionModel)


def test_hub_cache_snapshot_links_are_followed(tmp_path, saved_diffusion):
    repo = tmp_path / "models--owner--ddpm"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for file in saved_diffusion.iterdir():
        file.rename(repo / "blobs" / file.name)
        (snapshot / file.name).symlink_to(Path("../../blobs") / file.name)
    assert isinstance(DiffusionModel.from_pretrained(snapshot), DiffusionModel)


# ----------------------------------------------------------------------------- killed attacks

class _Killed(Exception):
    """Stands for the end of a session between two iterations of an attack."""


class _Watched(ProgressFile):
    """A progress file that notes the iteration of each save, the session ending after
    ``kill_after`` saves if given."""

    def __init__(self, path: Path, kill_after: int | None = None) -> None:
        super().__init__(path)
        self.kill_after, self.saved_steps = kill_after, []

    def save(self, progress: dict) -> None:
        super().save(progress)
        self.saved_steps.append(progress["step"])
        if len(self.saved_steps) == self.kill_after:
            raise _Killed


def _attack_with_noise(images: torch.Tensor, progress: ProgressFile | None = None) -> tuple:
    """Exact PGD-EOT on a victim-guided purifier, every random part on (the attacker's noise,
    held-out judge draws, momentum), built afresh as a new session would; its examples, trace
    and late examples."""
    diffusion, victim = make_tiny_diffusion(), make_tiny_victim()
    labels = victim(images).argmax(1)
    purifier = Purifier(diffusion, PurifierConfig(t_star=20, num_steps=2, victim_scale=3.0, seed=5), victim)
    judge = DefendedClassifier(victim, purifier.variant(seed=6))
    config = PGDConfig(eps=8 / 255, steps=5, eot=2, momentum=0.75, holdout_draws=2, seed=7)
    trace, late = [], []
    examples = pgd(DefendedClassifier(victim, purifier), images, labels, config, trace=trace, judge=judge,
                   late=late, progress=progress)
    return examples, trace, late


def test_an_attack_killed_between_iterations_resumes_to_the_same_result(tmp_path):
    images = make_tiny_images(3, seed=4, low=0.2, high=0.8)
    examples, trace, late = _attack_with_noise(images)
    path = tmp_path / "progress.pt"
    with pytest.raises(_Killed):
        _attack_with_noise(images, _Watched(path, kill_after=2))
    saved = ProgressFile(path).load()
    assert saved["step"] == 2 and len(saved["trace"]) == 2 and saved["late"] == []
    resumed_file = _Watched(path)
    resumed = _attack_with_noise(images, resumed_file)
    assert resumed_file.saved_steps == [3, 4, 5]  # from where it stopped, not from the start
    assert torch.equal(resumed[0], examples) and resumed[1] == trace
    assert len(late) == 1 and torch.equal(resumed[2][0], late[0])
    # progress kept to the end replays the result without iterating
    finished = _Watched(path)
    assert torch.equal(_attack_with_noise(images, finished)[0], examples) and finished.saved_steps == []
    # progress of other inputs, or cut short (unreadable), is ignored: the attack starts afresh
    others = make_tiny_images(3, seed=5, low=0.2, high=0.8)
    elsewhere = _Watched(path)
    assert torch.equal(_attack_with_noise(others, elsewhere)[0], _attack_with_noise(others)[0])
    assert elsewhere.saved_steps == [1, 2, 3, 4, 5]
    path.write_bytes(path.read_bytes()[:100])
    torn = _Watched(path)
    assert torch.equal(_attack_with_noise(images, torn)[0], examples) and torn.saved_steps == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------- killed training

@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train-data")
    for label in range(2):
        for i in range(4):
            _png(root / "train" / f"class{label}" / f"{i}.png", _rgb(seed=10 * label + i))
    return root


def _train(command: str, data: Path, out: Path, *settings: str) -> list[str]:
    return [sys.executable, "-m", "distpure", command, "--set", f"data_root={data}", f"output_dir={out}",
            "device=cpu", *settings]


def _kill_after_first_checkpoint(command: list[str], out: Path, steps: int) -> int:
    """Start ``command``, SIGKILL it once ``checkpoint.pt`` exists; the step it had reached."""
    log = out.parent / f"{out.name}.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(command, env=ENV, stdout=output, stderr=output)
        try:
            deadline = time.monotonic() + 300
            while process.poll() is None and time.monotonic() < deadline \
                    and not (out / "checkpoint.pt").exists():
                time.sleep(0.005)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, f"exit {process.returncode}:\n{log.read_text()}"
    step = load_if_exists(out / "checkpoint.pt")["step"]
    assert 0 < step < steps, f"killed at step {step} of {steps}"
    return step


def _assert_identical(ours, theirs, where: str = "") -> None:
    """Nested checkpoint contents equal bit for bit (wall-clock seconds excepted)."""
    if isinstance(ours, torch.Tensor):
        assert torch.equal(ours, theirs), f"{where} differs"
    elif isinstance(ours, dict):
        assert ours.keys() == theirs.keys(), where
        for key in ours:
            if key != "seconds":
                _assert_identical(ours[key], theirs[key], f"{where}/{key}")
    elif isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _assert_identical(a, b, f"{where}/{i}")
    else:
        assert ours == theirs, where


def _killed_run_matches_uninterrupted(tmp_path: Path, command: str, data: Path, steps: int,
                                      export: str, *settings: str) -> None:
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    uninterrupted = subprocess.run(_train(command, data, reference, *settings), env=ENV,
                                   capture_output=True, text=True, timeout=600)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    _kill_after_first_checkpoint(_train(command, data, resumed, *settings), resumed, steps)
    (resumed / "checkpoint.pt.tmp").write_bytes(os.urandom(4096))  # a torn save: must be ignored
    finished = subprocess.run(_train(command, data, resumed, *settings), env=ENV,
                              capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert not (resumed / "checkpoint.pt.tmp").exists()
    final = load_if_exists(resumed / "checkpoint.pt")
    assert final["step"] == steps
    _assert_identical(final, load_if_exists(reference / "checkpoint.pt"), "checkpoint")
    ours, theirs = load_file(resumed / export), load_file(reference / export)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), f"{export}: {key} differs"


def test_killed_diffusion_training_resumes_bit_identically(tmp_path, train_data):
    _killed_run_matches_uninterrupted(
        tmp_path, "train-diffusion", train_data, 12, "ema/diffusion_pytorch_model.safetensors",
        "steps=12", "checkpoint_every=3", "channels=[32,32]", "batch_size=4", "max_timestep=50")


@pytest.fixture(scope="module")
def denoising_models(tmp_path_factory) -> SimpleNamespace:
    """A saved tiny diffusion model to denoise with, and saved small-ResNet weights to start from."""
    root = tmp_path_factory.mktemp("denoising-models")
    make_tiny_diffusion().save_pretrained(root / "diffusion")
    torch.manual_seed(3)
    save_state_dict(load_classifier("cifar10-small-resnet"), root / "init.safetensors")
    return SimpleNamespace(diffusion=root / "diffusion", init=root / "init.safetensors")


@pytest.mark.parametrize("training", ["pgd", "denoised"])
def test_killed_classifier_training_resumes_bit_identically(tmp_path, train_data, denoising_models, training):
    """PGD training, and training on denoised batches from initial weights (the fine-tuned
    victim's: the checkpoint, not ``init``, must win on resuming)."""
    settings = {"pgd": ["attack_steps=1"],
                "denoised": ["adversarial=none", "denoise_sigma=0.25", f"diffusion={denoising_models.diffusion}",
                             f"init={denoising_models.init}"]}[training]
    _killed_run_matches_uninterrupted(
        tmp_path, "train-classifier", train_data, 8, "model.safetensors",
        "arch=cifar10-small-resnet", "steps=8", "checkpoint_every=2", "batch_size=8", *settings)


def _denoising_config(tmp_path: Path, data: Path, diffusion: Path, **settings) -> ClassifierTrainingConfig:
    from distpure.training.classifier import ClassifierTrainingConfig

    return ClassifierTrainingConfig(data_root=str(data), output_dir=str(tmp_path / "run"), device="cpu",
                                    arch="cifar10-small-resnet", adversarial="none", denoise_sigma=0.25,
                                    diffusion=str(diffusion), batch_size=4, **settings)


def test_denoised_batches_are_the_certification_one_shot_denoisings(tmp_path, train_data, denoising_models):
    """A training batch is the clean batch plus N(0, σ²) noise, denoised exactly as certify's
    one-shot base classifier denoises the same draw, without gradient."""
    from distpure.certification.denoisers import build_base_classifier
    from distpure.training.classifier import denoised_batch, denoising_classifier, initial_model

    config = _denoising_config(tmp_path, train_data, denoising_models.diffusion)
    model = initial_model(config)
    clean = make_tiny_images(4, seed=2)
    torch.manual_seed(11)
    batch = denoised_batch(denoising_classifier(config, model, torch.device("cpu")), clean, 0.25)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(11)) * 0.25
    certifying = build_base_classifier(make_tiny_victim(), load_diffusion(denoising_models.diffusion), "one-shot", 0.25)
    with torch.no_grad():
        expected = certifying.denoiser(clean + noise).clamp(0.0, 1.0)
    assert torch.equal(batch, expected)
    assert (batch - clean).abs().mean() > 0.05 and not batch.requires_grad


def test_denoised_training_trains_on_denoised_batches(tmp_path, train_data, denoising_models, monkeypatch):
    """Every step's batch goes through ``denoised_batch``, and the model learns from its output."""
    from distpure.training import classifier

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = classifier.denoised_batch

    def spy(base, images, sigma):
        seen.append((images, original(base, images, sigma)))
        return seen[-1][1]

    monkeypatch.setattr(classifier, "denoised_batch", spy)
    classifier.train_classifier(_denoising_config(tmp_path, train_data, denoising_models.diffusion, steps=2))
    assert len(seen) == 2 and all(not torch.equal(clean, denoised) for clean, denoised in seen)


@pytest.mark.parametrize("init", ["file", "registered"])
def test_classifier_training_starts_from_init_weights(tmp_path, train_data, denoising_models, init):
    """``init`` (a weights file, or a registered classifier's own weights) is where training
    starts: with no step taken, the exported model is those weights (as float16)."""
    from distpure.training.classifier import ClassifierTrainingConfig, train_classifier

    name = str(denoising_models.init) if init == "file" else "cifar10-small-resnet-at"
    config = ClassifierTrainingConfig(data_root=str(train_data), output_dir=str(tmp_path / "tuned"), device="cpu",
                                      arch="cifar10-small-resnet", init=name, steps=0)
    exported = load_file(train_classifier(config))
    original = load_classifier(name, arch="cifar10-small-resnet").state_dict()
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k].half()) for k in original)


@pytest.mark.parametrize("settings, message", [
    ({"denoise_sigma": 0}, "denoise_sigma must be positive, got 0"),
    ({"denoise_sigma": -0.25}, "denoise_sigma must be positive, got -0.25"),
    ({"denoise_sigma": 0.25, "adversarial": "pgd"}, "set adversarial to 'none', got 'pgd'"),
    ({"init": "runs/missing/model.safetensors"}, "init 'runs/missing/model.safetensors' is neither a registered"),
    ({"diffusion": "cifar10-ddpm-large"}, "unknown diffusion model: 'cifar10-ddpm-large'"),
])
def test_bad_classifier_training_settings_are_refused_when_read(settings, message):
    from distpure.config import from_dict
    from distpure.training.classifier import ClassifierTrainingConfig

    with pytest.raises(ValueError, match=message):
        from_dict(ClassifierTrainingConfig, {"adversarial": "none", **settings})


def test_the_committed_denoised_training_config_fine_tunes_the_off_the_shelf_victim():
    from distpure.config import from_dict, load_yaml
    from distpure.training.classifier import ClassifierTrainingConfig

    root = Path(__file__).resolve().parents[1]
    values = load_yaml(root / "configs" / "training" / "cifar10-resnet18-denoised.yaml")
    config = from_dict(ClassifierTrainingConfig, values)
    assert (config.arch, config.init, config.adversarial, config.denoise_sigma) == \
        ("cifar10-resnet18", "cifar10-resnet18", "none", 0.25)
    assert config.output_dir == "results/cifar10-resnet18-denoised"


def test_diffusion_training_fine_tunes_from_a_trained_model(tmp_path, train_data):
    """``init_from`` starts the weights (and their EMA) at a trained model's: with no step
    taken, the exported model is that model (as float16)."""
    from distpure.models.diffusion import DiffusionModel, default_scheduler, small_unet
    from distpure.training.diffusion import DiffusionTrainingConfig, train_diffusion

    torch.manual_seed(5)
    DiffusionModel(small_unet(32, (32, 64)), default_scheduler()).save_pretrained(tmp_path / "trained")
    config = DiffusionTrainingConfig(data_root=str(train_data), output_dir=str(tmp_path / "tuned"), device="cpu",
                                     channels=(32, 64), steps=0, init_from=str(tmp_path / "trained"))
    exported = load_file(train_diffusion(config) / "diffusion_pytorch_model.safetensors")
    original = load_file(tmp_path / "trained" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k].half()) for k in original)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    from distpure.training.diffusion import DiffusionTrainingConfig, learning_rate

    config = DiffusionTrainingConfig(learning_rate=1.0, warmup_steps=10, steps=110, lr_schedule="cosine")
    assert learning_rate(config, 4) == pytest.approx(0.5)
    assert learning_rate(config, 9) == pytest.approx(1.0) and learning_rate(config, 60) == pytest.approx(0.5)
    assert learning_rate(config, 110) == pytest.approx(0.0)
    assert learning_rate(DiffusionTrainingConfig(learning_rate=1.0, warmup_steps=10), 500) == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        DiffusionTrainingConfig(lr_schedule="step")
