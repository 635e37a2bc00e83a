"""Data loading: the CIFAR-10 JPEG copy, ImageNet-30 samples, image modes, and malformed input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distpure.data import (CIFAR10_CLASSES, DataError, list_class_folder, load_cifar10, load_dataset,
                           load_image_folder, load_imagenet30, read_image)
from distpure.evaluation.config import DataConfig


@pytest.fixture(scope="module")
def cifar10_root(require_shared) -> Path:
    return require_shared("data/cifar10-jpeg")


def test_cifar10_jpeg_subset(cifar10_root: Path) -> None:
    data = load_cifar10(cifar10_root, split="test", n=20, seed=0, download=False)
    assert len(data) == 20
    assert data.images.shape == (20, 3, 32, 32)
    assert data.images.dtype == torch.float32
    assert data.images.min() >= 0.0 and data.images.max() <= 1.0
    assert data.images.std() > 0.05  # real pictures, not a constant
    assert data.labels.dtype == torch.long
    assert data.labels.min() >= 0 and data.labels.max() <= 9
    assert data.classes == CIFAR10_CLASSES
    # labels agree with the class folder each file came from
    assert len(data.paths) == 20
    for path, label in zip(data.paths, data.labels.tolist()):
        assert Path(path).parent.name == CIFAR10_CLASSES[label]
        assert Path(path).parent.parent.name == "test"


def test_cifar10_subset_is_seeded(cifar10_root: Path) -> None:
    a = load_cifar10(cifar10_root, n=20, seed=0, download=False)
    b = load_cifar10(cifar10_root, n=20, seed=0, download=False)
    c = load_cifar10(cifar10_root, n=20, seed=1, download=False)
    assert a.paths == b.paths
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.paths != c.paths


def test_cifar10_subset_keeps_its_seeded_random_order(cifar10_root: Path) -> None:
    """A prefix of the evaluation order is a fair sample: the first 10 % of a 1,000-image subset
    holds at least 6 classes (in the folders' class order it held airplanes only). A smaller
    subset with the same seed is a prefix of a larger one, and every image keeps its dataset
    index: its position in the folder listing."""
    data = load_cifar10(cifar10_root, n=1000, seed=0, download=False)
    assert len(set(data.labels[:100].tolist())) >= 6
    first = load_cifar10(cifar10_root, n=100, seed=0, download=False)
    assert first.paths == data.paths[:100] and torch.equal(first.indices, data.indices[:100])
    listing, _ = list_class_folder(cifar10_root / "test")
    assert [str(listing[i][0]) for i in data.indices.tolist()] == list(data.paths)


def test_every_loader_returns_a_seeded_random_order(tmp_path: Path, monkeypatch) -> None:
    """All images (n=None) come in seeded order too, from an image folder and from the original
    CIFAR-10 release (a stand-in for torchvision's CIFAR10, class-ordered like the folders)."""
    labels = [label for label in range(3) for _ in range(8)]
    for i, label in enumerate(labels):
        (tmp_path / "folder" / f"c{label}").mkdir(parents=True, exist_ok=True)
        _save(Image.new("RGB", (4, 4), (i, 0, 0)), tmp_path / "folder" / f"c{label}" / f"{i:02d}.png")

    class FakeCIFAR10:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            self.data = np.zeros((len(labels), 32, 32, 3), dtype=np.uint8)
            self.data[:, 0, 0, 0] = np.arange(len(labels))
            self.targets, self.classes = labels, ["a", "b", "c"]

        def __len__(self) -> int:
            return len(self.targets)

    monkeypatch.setattr("torchvision.datasets.CIFAR10", FakeCIFAR10)
    for data in (load_image_folder(tmp_path / "folder", seed=3),
                 load_cifar10(tmp_path / "release", seed=3)):
        assert data.labels.tolist() != sorted(data.labels.tolist())
        assert sorted(data.indices.tolist()) == list(range(len(labels)))
        # each image is the one at its dataset index: the red value encodes the index
        assert (data.images[:, 0, 0, 0] * 255).round().long().tolist() == data.indices.tolist()
        assert data.labels.tolist() == [labels[i] for i in data.indices.tolist()]


def test_cifar10_bad_split(cifar10_root: Path) -> None:
    with pytest.raises(DataError, match="split must be 'train' or 'test'"):
        load_cifar10(cifar10_root, split="validation")


def test_imagenet30_samples(require_shared) -> None:
    root = require_shared("data/imagenet30-samples")
    data = load_imagenet30(root)
    assert data.images.shape == (30, 3, 256, 256)
    assert data.images.min() >= 0.0 and data.images.max() <= 1.0
    assert len(data.classes) == 30
    assert sorted(data.labels.tolist()) == list(range(30))


def test_data_size_resizes_imagenet30_and_is_checked(require_shared) -> None:
    """``data.size`` reaches the loader (a 64-px ADM's input) and bad sizes are refused on reading."""
    root = require_shared("data/imagenet30-samples")
    small = load_dataset("imagenet30", root, n=2, size=64)
    assert small.images.shape == (2, 3, 64, 64)
    assert torch.equal(small.labels, load_dataset("imagenet30", root, n=2).labels)
    for bad in (0, 4, 2.5, True):
        with pytest.raises(ValueError, match="data.size"):
            DataConfig(dataset="imagenet30", size=bad)
    with pytest.raises(ValueError, match="CIFAR-10 stays 32x32"):
        DataConfig(dataset="cifar10", size=64)


# --- image modes ---------------------------------------------------------------------------------


def _save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    array = np.arange(6 * 5, dtype=np.uint8).reshape(5, 6) * 8
    tensor = read_image(_save(Image.fromarray(array, mode="L"), tmp_path / "gray.png"))
    assert tensor.shape == (3, 5, 6) and tensor.dtype == torch.float32
    expected = torch.from_numpy(array).float() / 255.0
    for channel in tensor:
        torch.testing.assert_close(channel, expected)


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    array = np.zeros((4, 4, 4), dtype=np.uint8)
    array[..., 0] = 255             # red ...
    array[:2, :, 3] = 255           # ... opaque in the top half
    array[2:, :, 3] = 0             # fully transparent in the bottom half
    tensor = read_image(_save(Image.fromarray(array, mode="RGBA"), tmp_path / "rgba.png"))
    assert tensor.shape == (3, 4, 4)
    torch.testing.assert_close(tensor[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(tensor[:, 3, 3], torch.tensor([1.0, 1.0, 1.0]))


def test_palette_image_is_expanded(tmp_path: Path) -> None:
    image = Image.new("P", (3, 2))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    image.putdata([0, 1, 2, 2, 1, 0])
    tensor = read_image(_save(image, tmp_path / "palette.png"))
    assert tensor.shape == (3, 2, 3)
    torch.testing.assert_close(tensor[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(tensor[:, 0, 1], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(tensor[:, 0, 2], torch.tensor([0.0, 0.0, 1.0]))


def test_resize_and_center_crop(tmp_path: Path) -> None:
    image = Image.new("RGB", (64, 40), (10, 20, 30))
    tensor = read_image(_save(image, tmp_path / "wide.png"), size=32)
    assert tensor.shape == (3, 32, 32)
    torch.testing.assert_close(tensor[:, 16, 16], torch.tensor([10, 20, 30]) / 255.0, atol=2 / 255, rtol=0)


# --- malformed input -----------------------------------------------------------------------------


def test_truncated_image_names_the_file(tmp_path: Path) -> None:
    array = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = _save(Image.fromarray(array), tmp_path / "broken.png")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="broken.png"):
        read_image(path)


def test_garbage_image_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.jpg"
    path.write_bytes(b"this is not a JPEG at all" * 10)
    with pytest.raises(DataError, match="garbage.jpg.*not a readable image"):
        read_image(path)


def test_corrupt_file_in_a_folder_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    _save(Image.new("RGB", (8, 8)), tmp_path / "cat" / "good.png")
    (tmp_path / "cat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(DataError, match="bad.png"):
        load_image_folder(tmp_path)


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="contain no image files"):
        load_image_folder(tmp_path)


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such directory"):
        load_image_folder(tmp_path / "nowhere")


def test_cifar10_without_data_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no CIFAR-10 image folder"):
        load_cifar10(tmp_path, download=False)


def test_mixed_sizes_load_with_a_size(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    _save(Image.new("RGB", (8, 8)), tmp_path / "a" / "small.png")
    _save(Image.new("RGB", (12, 10)), tmp_path / "a" / "wide.png")
    assert load_image_folder(tmp_path, size=8).images.shape == (2, 3, 8, 8)


# --- the shared-data helper of conftest ----------------------------------------------------------


def test_missing_shared_data_skips_or_fails(require_shared, monkeypatch) -> None:
    monkeypatch.delenv("DISTPURE_REQUIRE_DATA", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-dataset"):
        require_shared("data/no-such-dataset")
    monkeypatch.setenv("DISTPURE_REQUIRE_DATA", "1")
    with pytest.raises(pytest.fail.Exception, match="no-such-dataset.*DISTPURE_REQUIRE_DATA=1"):
        require_shared("data/no-such-dataset")
