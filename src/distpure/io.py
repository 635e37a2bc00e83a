"""Folders of image files in, purified PNGs out: streamed in batches, bad files listed, not fatal."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .data import IMAGE_SUFFIXES, DataError, is_image_file, read_image

OUTPUT_SUFFIX = ".png"


@dataclass
class PurifyReport:
    written: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """Write a 3 x H x W image in [0, 1] as an 8-bit PNG."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path)


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files below ``folder`` (recursively), sorted; an error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such directory")
    files = sorted(p for p in folder.rglob("*") if is_image_file(p))
    if not files:
        raise DataError(f"{folder}: contains no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def _readable_batches(files: list[Path], size: int, resize: bool, batch_size: int,
                      report: PurifyReport) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """Batches of (files, images) that can be purified; unreadable or wrong-size files go to
    ``report.failed`` with the reason."""
    batch_files, batch_images = [], []
    for path in files:
        try:
            image = read_image(path, size if resize else None)
        except DataError as error:
            report.failed.append((str(path), str(error).split(": ", 1)[-1]))
            continue
        if tuple(image.shape[1:]) != (size, size):
            report.failed.append((str(path), f"image is {image.shape[2]}x{image.shape[1]}, the model "
                                             f"works at {size}x{size} (use --resize)"))
            continue
        batch_files.append(path)
        batch_images.append(image)
        if len(batch_files) == batch_size:
            yield batch_files, torch.stack(batch_images)
            batch_files, batch_images = [], []
    if batch_files:
        yield batch_files, torch.stack(batch_images)


def _output_name(path: Path, input_dir: Path) -> Path:
    """The purified file's name relative to the output folder: the input's, with a .png suffix."""
    return path.relative_to(input_dir).with_suffix(OUTPUT_SUFFIX)


def _drop_name_clashes(files: list[Path], input_dir: Path, report: PurifyReport) -> list[Path]:
    """The files whose output name no earlier file takes (``a.jpg`` and ``a.png`` would both
    write ``a.png``); the others go to ``report.failed``."""
    taken: dict[Path, Path] = {}
    for path in files:
        name = _output_name(path, input_dir)
        if name in taken:
            report.failed.append((str(path), f"its output {name} is already the output of {taken[name]}"))
        else:
            taken[name] = path
    return list(taken.values())


def purify_folder(purifier: torch.nn.Module, input_dir: str | Path, output_dir: str | Path,
                  resize: bool = False, batch_size: int | None = None) -> PurifyReport:
    """Purify every image below ``input_dir`` into ``output_dir`` (same relative names, .png)."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    files = list_image_files(input_dir)
    size = purifier.diffusion.sample_size
    device = next(purifier.diffusion.parameters()).device
    batch_size = batch_size or purifier.config.batch_size
    report = PurifyReport()
    files = _drop_name_clashes(files, input_dir, report)
    with tqdm(total=len(files), desc="purify", dynamic_ncols=True) as progress:
        for batch_files, images in _readable_batches(files, size, resize, batch_size, report):
            with torch.no_grad():
                purified = purifier(images.to(device))
            for path, image in zip(batch_files, purified):
                save_png(image, output_dir / _output_name(path, input_dir))
            report.written += len(batch_files)
            progress.update(len(batch_files))
    return report
