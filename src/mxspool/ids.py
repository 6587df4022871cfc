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


# Two digits per step: _encode's divisions and string pieces, halved (it ran once per message on
# the intake's event loop, ~2% of its time there).
_PAIRS = tuple(high + low for high in _ALPHABET for low in _ALPHABET)


def _encode(number: int, width: int) -> str:
    """``number`` as ``width`` digits of _ALPHABET, most significant first (``width`` even)."""
    pairs = []
    base = len(_PAIRS)
    for _ in range(width // 2):
        pairs.append(_PAIRS[number % base])
        number //= base
    pairs.reverse()
    return "".join(pairs)


def new_queue_id() -> str:
    """18 characters: milliseconds since the epoch, then about 39 random bits."""
    # 62 random bits reduced modulo the space: the bias, under 2^-22, does not matter to ids
    # that need uniqueness only; getrandbits is one C call where randrange is several, and 62
    # bits stay a machine integer in the compiled module (mypyc's short int).
    return _encode(time.time_ns() // 1_000_000, 10) + _encode(
        _random.getrandbits(62) % _RANDOM_SPACE, 8
    )
