"""Files written whole or not at all: a session killed mid-write leaves the previous complete
file (or none) under the name, never half of the new one."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write`` the file to ``<path>.tmp``, flush it to disk, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    descriptor = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(tmp, path)
