"""Image data as float tensors in [0, 1] (N x 3 x H x W) with integer labels.

Sources: the original CIFAR-10 release through torchvision, any class-per-folder image tree
(e.g. the CIFAR-10 JPEG copy), and ImageNet-30-style folders resized and center-cropped.

Every loader returns its images in a seeded random order (``subset_indices``), never in the
source's order: folders list class by class, so a prefix of the listing, such as the records
of an evaluation stopped early, would hold the first classes only. ``LabelledImages.indices``
keeps each image's position in the source.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


class DataError(ValueError):
    """Raised when a data source is missing, empty or malformed; the message names the culprit."""


@dataclass
class LabelledImages:
    """A batch of images in [0, 1] with labels, class names, the files they came from and each
    image's dataset index (its position in the source's own order; 0, 1, ... when not given)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    paths: tuple[str, ...] = ()
    indices: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.indices is None:
            self.indices = torch.arange(len(self.labels))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None, seed: int = 0) -> "LabelledImages":
        """A deterministic random subset of n samples (all of them if n is None or too large),
        in the seeded order of ``subset_indices``; dataset indices are carried along."""
        index = subset_indices(len(self), n, seed)
        paths = tuple(self.paths[i] for i in index) if self.paths else ()
        return LabelledImages(self.images[index], self.labels[index], self.classes, paths,
                              self.indices[index])


    def without_first(self, count: int) -> "LabelledImages":
        """All but the first ``count`` samples (of a seeded order: a subset disjoint from that prefix)."""
        paths = self.paths[count:] if self.paths else ()
        return LabelledImages(self.images[count:], self.labels[count:], self.classes, paths,
                              self.indices[count:])


def subset_indices(total: int, n: int | None, seed: int = 0) -> torch.Tensor:
    """The first n of a seeded random permutation of ``range(total)`` (all of it if n is None),
    in that random order: any prefix is a fair sample of the classes, and a smaller n with the
    same seed gives a prefix of a larger one."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:n]


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def read_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    """Read one image file as a 3 x H x W float tensor in [0, 1].

    Grayscale, palette and alpha images are converted to RGB (alpha composited on white).
    With ``size``, the shorter side is resized to ``size`` and the centre ``size`` x ``size`` kept.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            rgb = _to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: not a readable image ({error})") from error
    if size is not None:
        rgb = resize_center_crop(rgb, size)
    array = np.asarray(rgb, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL image: alpha composited on white, 16/32-bit grayscale rescaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        gray = np.clip(array / peak * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic) and crop the central square."""
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                           Image.BICUBIC)
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def list_class_folder(root: str | Path) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    """(file, label) pairs of a class-per-folder tree; classes sorted by name as in ImageFolder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory")
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if not classes:
        raise DataError(f"{root}: no class sub-folders (expected <root>/<class>/<image>)")
    items = [(f, label) for label, name in enumerate(classes)
             for f in sorted((root / name).iterdir()) if is_image_file(f)]
    if not items:
        raise DataError(f"{root}: class folders contain no image files")
    return items, classes


def load_image_folder(root: str | Path, n: int | None = None, seed: int = 0,
                      size: int | None = None) -> LabelledImages:
    """Load a class-per-folder image tree in seeded random order (a subset of n images if n is
    given); dataset indices are positions in ``list_class_folder``'s listing."""
    items, classes = list_class_folder(root)
    index = subset_indices(len(items), n, seed)
    chosen = [items[i] for i in index.tolist()]
    images = _read_same_size([path for path, _ in chosen], size)
    labels = torch.tensor([label for _, label in chosen], dtype=torch.long)
    return LabelledImages(images, labels, classes, tuple(str(p) for p, _ in chosen), index)


def _read_same_size(paths: list[Path], size: int | None) -> torch.Tensor:
    """One N x 3 x H x W tensor filled in place (no second copy of the data while loading), or a
    DataError naming the first image whose size differs."""
    if not paths:
        return torch.empty(0, 3, 0, 0)
    first = read_image(paths[0], size)
    images = torch.empty(len(paths), *first.shape)
    images[0] = first
    for i, path in enumerate(paths[1:], start=1):
        image = read_image(path, size)
        if image.shape != first.shape:
            raise DataError(f"{path}: image is {image.shape[2]}x{image.shape[1]} but {paths[0]} is "
                            f"{first.shape[2]}x{first.shape[1]}; pass size= to resize them")
        images[i] = image
    return images


def load_cifar10(root: str | Path, split: str = "test", n: int | None = None,
                 seed: int = 0, download: bool = True) -> LabelledImages:
    """CIFAR-10 from an image-folder copy (``root/<split>/<class>/*``) or the original release.

    If ``root/<split>`` is a folder tree it is read as images; otherwise torchvision's CIFAR10
    reads (and, with ``download``, fetches) the original pickled release under ``root``.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root) / split
    if folder.is_dir():
        return load_image_folder(folder, n=n, seed=seed)
    from torchvision.datasets import CIFAR10

    try:
        dataset = CIFAR10(str(root), train=split == "train", download=download)
    except (RuntimeError, OSError) as error:
        raise DataError(f"{root}: no CIFAR-10 image folder at {folder} and the original "
                        f"release could not be loaded ({error})") from error
    index = subset_indices(len(dataset), n, seed)
    images = torch.from_numpy(dataset.data[index.numpy()]).permute(0, 3, 1, 2).float() / 255.0
    labels = torch.tensor(dataset.targets)[index]
    return LabelledImages(images, labels, tuple(dataset.classes), indices=index)


def load_imagenet30(root: str | Path, n: int | None = None, seed: int = 0,
                    size: int = 256) -> LabelledImages:
    """An ImageNet-30-style folder (``root/<class>/*``), resized and center-cropped to ``size``."""
    return load_image_folder(root, n=n, seed=seed, size=size)


def load_dataset(name: str, root: str | Path, split: str = "test", n: int | None = None,
                 seed: int = 0, size: int | None = None) -> LabelledImages:
    """Load a dataset by name: ``cifar10``, ``imagenet30`` or ``folder``; ``size`` resizes the
    folder datasets (ImageNet-30 defaults to 256)."""
    if name == "cifar10":
        return load_cifar10(root, split=split, n=n, seed=seed)
    if name == "imagenet30":
        return load_imagenet30(root, n=n, seed=seed, size=size or 256)
    if name == "folder":
        return load_image_folder(root, n=n, seed=seed, size=size)
    raise DataError(f"unknown dataset {name!r}; expected 'cifar10', 'imagenet30' or 'folder'")


def default_data_root() -> Path:
    """Where data lives by default: $DISTPURE_DATA, else ``../shared/data`` beside the checkout."""
    import os

    env = os.environ.get("DISTPURE_DATA")
    if env:
        return Path(env)
    for base in (Path.cwd(), *Path.cwd().parents):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data"
