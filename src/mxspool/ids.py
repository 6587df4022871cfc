"""Queue ids: short, unique, and sortable by arrival time."""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"  # no vowels: ids never spell words


def _encode(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, rem = divmod(number, len(_ALPHABET))
        digits.append(_ALPHABET[rem])
    return "".join(reversed(digits))


def new_queue_id() -> str:
    """18 characters: milliseconds since the epoch, then about 39 random bits."""
    return _encode(time.time_ns() // 1_000_000, 10) + _encode(
        secrets.randbelow(len(_ALPHABET) ** 8), 8
    )
