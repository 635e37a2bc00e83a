"""What a run records about itself: config, seed, code version, packages, device, wall time."""
from __future__ import annotations

import json
import platform
import subprocess
import time
from importlib import metadata as importlib_metadata
from pathlib import Path

import torch

from ..atomic import write_atomically
from ..devices import hardware

PACKAGES = ("distpure", "torch", "torchvision", "diffusers", "safetensors", "pyautoattack", "numpy")


def git_commit() -> str | None:
    """The commit of the distpure checkout, if it is one."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment(device: torch.device, precision: str = "auto") -> dict:
    """Code and machine behind a run: commit, packages, Python, and the hardware with
    ``precision`` as configured and as resolved on ``device``."""
    return {"git_commit": git_commit(), "packages": package_versions(), "python": platform.python_version(),
            "hardware": hardware(device, precision)}


class RunClock:
    """Wall time accumulated over every (resumed) session of a run, kept in ``metadata.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        previous = json.loads(path.read_text()) if path.is_file() else {}
        self.previous_seconds = float(previous.get("wall_time_seconds", 0.0))
        self.started = time.monotonic()

    def seconds(self) -> float:
        return self.previous_seconds + time.monotonic() - self.started

    def save(self) -> None:
        """Record the wall time so far, so that a killed run does not lose it."""
        previous = json.loads(self.path.read_text()) if self.path.is_file() else {}
        text = json.dumps({**previous, "wall_time_seconds": round(self.seconds(), 1)}, indent=2)
        write_atomically(self.path, lambda tmp: tmp.write_text(text))
