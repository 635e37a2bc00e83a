"""Image grids of a run's kept examples: clean, adversarial, purified and the amplified
perturbation, one PNG per (defence, attack) file."""
from __future__ import annotations

from pathlib import Path

from .plots import new_figure



def image_grid(examples: Path, path: Path) -> Path | None:
    """Clean / adversarial / purified / amplified |adv − clean| rows of one example file."""
    import numpy as np
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(examples))
        clean, adversarial, purified = (tensors[key].float().cpu()
                                        for key in ("clean", "adversarial", "purified"))
    except (KeyError, OSError, ValueError, RuntimeError):
        return None
    if clean.ndim != 4 or len(clean) == 0:
        return None
    difference = (adversarial - clean).abs()
    peak = difference.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    difference = difference / peak
    rows = [("clean", clean), ("adversarial", adversarial), ("purified", purified),
            ("|adv − clean|\n(scaled)", difference)]

    def strip(images) -> "np.ndarray":
        images = images.clamp(0, 1)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        images = images[:, :3].permute(0, 2, 3, 1).numpy()
        gap = np.ones((images.shape[1], max(1, images.shape[2] // 16), 3), dtype=images.dtype)
        parts = []
        for image in images:
            parts += [image, gap]
        return np.concatenate(parts[:-1], axis=1)

    count = len(clean)
    figure = new_figure((1.0 + 1.0 * count, 4.4))
    axes_list = figure.subplots(len(rows), 1)
    for axes, (label, images) in zip(axes_list, rows):
        axes.imshow(strip(images), interpolation="nearest")
        axes.set_xticks([])
        axes.set_yticks([])
        for spine in axes.spines.values():
            spine.set_visible(False)
        axes.set_ylabel(label, rotation=0, ha="right", va="center", fontsize="small")
    defense, _, attack = examples.stem.partition("__")
    figure.suptitle(f"{defense} / {attack}", fontsize="medium")
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path
