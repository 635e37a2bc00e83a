"""Wall time and resident-memory growth of one piece of work (Linux /proc; None elsewhere)."""
from __future__ import annotations

import contextlib
import ctypes
import re
import time
from pathlib import Path
from typing import Callable

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


def measure(run: Callable[[], object]) -> tuple[float, float | None]:
    """(wall seconds, resident-set growth in MiB or None) of one call of ``run``."""
    before = status_kib("VmRSS") if _reset_peak_rss() else None
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")
    return seconds, None if before is None or peak is None else (peak - before) / 1024
