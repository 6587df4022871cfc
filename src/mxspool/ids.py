"""Queue ids: short, unique, and sortable by arrival time."""

from __future__ import annotations

import os
import random
import time

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"  # no vowels: ids never spell words
_RANDOM_SPACE = len(_ALPHABET) ** 8

# Queue ids need uniqueness, not secrecy (they are shown to every client in "queued as"), so a
# generator seeded once from the OS is enough; secrets.randbelow cost a getrandom() call and
# ~15 us per message on the intake's event loop. Reseeded after fork, so that two processes
# never share a sequence.
_random = random.Random(os.urandom(16))
os.register_at_fork(after_in_child=lambda: _random.seed(os.urandom(16)))


def _encode(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, rem = divmod(number, len(_ALPHABET))
        digits.append(_ALPHABET[rem])
    return "".join(reversed(digits))


def new_queue_id() -> str:
    """18 characters: milliseconds since the epoch, then about 39 random bits."""
    return _encode(time.time_ns() // 1_000_000, 10) + _encode(_random.randrange(_RANDOM_SPACE), 8)
