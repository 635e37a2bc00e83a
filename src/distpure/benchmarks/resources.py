"""Wall time and peak-memory growth of one piece of work: the resident set on a CPU (Linux /proc;
None elsewhere), ``torch.cuda.max_memory_allocated`` on a GPU."""
from __future__ import annotations

import contextlib
import ctypes
import re
import time
from pathlib import Path
from typing import Callable

import torch

STATUS = Path("/proc/self/status")


def status_kib(field_name: str) -> int | None:
    """A ``kB`` field of /proc/self/status (None off Linux)."""
    if not STATUS.is_file():
        return None
    match = re.search(rf"^{field_name}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    """Return freed heap to the OS and reset the resident-set high-water mark (Linux, glibc)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def synchronize(device: torch.device | str) -> None:
    """Wait for ``device``'s queued kernels, so that a wall time covers them (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def wall_seconds(work: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """The wall time of one call of ``work`` on ``device`` (its queued kernels included)."""
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


def measure(run: Callable[[], object], device: torch.device | str = "cpu") -> tuple[float, float | None]:
    """(wall seconds, peak-memory growth in MiB or None) of one call of ``run``: growth of the
    resident set on a CPU, of the allocated CUDA memory on a GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = status_kib("VmRSS") * 1024 if _reset_peak_rss() else None
    start = time.perf_counter()
    run()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak_kib = status_kib("VmHWM")
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else None if peak_kib is None else peak_kib * 1024)
    return seconds, None if before is None or peak is None else (peak - before) / 2**20
