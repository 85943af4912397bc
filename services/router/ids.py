"""Request and transfer ids: 128 random bits as 32 hex digits, without a system call per id."""

from __future__ import annotations

import random

_random = random.Random()  # seeded from the OS at start; ids need uniqueness, not secrecy


def new_id() -> str:
    """A fresh 32-hex-digit id (request ids are also the decision events' and the trace's)."""
    return f"{_random.getrandbits(128):032x}"
