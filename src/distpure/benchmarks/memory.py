"""Peak resident memory of ``distpure purify`` and ``distpure evaluate`` as the input grows.

Each command runs as the only child of a fresh helper process, whose ``RUSAGE_CHILDREN`` then
holds that child's peak RSS::

    python -m distpure.benchmarks.memory purify 1000 10000
    python -m distpure.benchmarks.memory evaluate 1000 10000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import dump_yaml

# Runs argv[1:] and prints its exit code and ru_maxrss (KiB on Linux) as the helper's last line.
_HELPER = ("import resource, subprocess, sys; "
           "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
           "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss_mib(command: list[str], cwd: str | Path | None = None) -> float:
    """Peak resident memory (MiB) of ``command`` run to completion (one thread, no progress bars)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, "-c", _HELPER, *command], capture_output=True, text=True,
                            env=env, cwd=cwd)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines or lines[-1].split()[0] != "0":
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return int(lines[-1].split()[1]) / 1024


def write_synthetic_pngs(folder: Path, count: int, size: int = 32, seed: int = 0) -> Path:
    """``count`` random ``size`` x ``size`` RGB PNGs in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.png")
    return folder


def _measure(name: str, size: int, command: list[str]) -> dict:
    start = time.monotonic()
    peak = peak_rss_mib(command)
    return {"command": name, "images": size, "peak_rss_mib": round(peak, 1),
            "seconds": round(time.monotonic() - start, 1), "argv": command[2:]}


def purify_peak_rss(count: int) -> dict:
    """Peak RSS of ``distpure purify`` (1 step from t* = 10) on ``count`` synthetic 32 x 32 PNGs."""
    with tempfile.TemporaryDirectory(prefix="distpure-memory-") as tmp:
        images = write_synthetic_pngs(Path(tmp) / "in", count)
        return _measure("purify", count, [sys.executable, "-m", "distpure", "purify", str(images),
                                          str(Path(tmp) / "out"), "--device", "cpu",
                                          "--set", "num_steps=1", "t_star=10"])


def evaluate_peak_rss(limit: int, data_root: str | None = None) -> dict:
    """Peak RSS of ``distpure evaluate`` on ``limit`` CIFAR-10 test images (clean, no defence)."""
    experiment = {"name": "memory", "data": {"dataset": "cifar10", "root": data_root, "limit": limit},
                  "defenses": [{"name": "none", "kind": "none"}],
                  "attacks": [{"name": "clean", "kind": "clean"}], "device": "cpu", "batch_size": 256}
    with tempfile.TemporaryDirectory(prefix="distpure-memory-") as tmp:
        config = Path(tmp) / "memory.yaml"
        config.write_text(dump_yaml(experiment))
        return _measure("evaluate", limit, [sys.executable, "-m", "distpure", "evaluate", str(config),
                                            "--out", str(Path(tmp) / "run")])


def main(argv: list[str] | None = None) -> None:
    """Print one JSON line per measurement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["purify", "evaluate"])
    parser.add_argument("sizes", type=int, nargs="+", help="numbers of images")
    parser.add_argument("--data-root", help="CIFAR-10 root for evaluate (default: the shared copy)")
    args = parser.parse_args(argv)
    for size in args.sizes:
        result = (purify_peak_rss(size) if args.command == "purify"
                  else evaluate_peak_rss(size, args.data_root))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
