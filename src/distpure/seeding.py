"""Named random streams: every seed in distpure is derived from a base seed and role names, so
that two roles (the attacker's noise, the scorer's draws, PGD's random start) never share one."""
from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 31-bit seed that depends only on ``parts`` (the same on every process and platform)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
