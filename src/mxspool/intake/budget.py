"""The spool disk's budget: free space less what the SMTP sessions in flight will still write.

Free space alone is not enough: a MAIL FROM that sees 2 GiB free may be one of a hundred sessions
each about to send 150 MiB, and every byte of DATA is written once to the store at the commit
(and, past ``spill_threshold``, once more to a temporary file first, which the free space
measured meanwhile already shows). So each transaction holds a :class:`Claim` from MAIL FROM to
the end of its DATA: the SIZE= it declared, grown to the bytes actually received. A MAIL FROM is
refused when free space minus every claim (and the new SIZE=) is below ``min_free_space``, and so
is a DATA piece that would grow its claim past that point; the session then reads to the end of
the content and answers 452 4.3.1 instead of spooling on.

Free space is measured at most once a second (statvfs is a syscall); in between, a stored
message's bytes are taken off the last measurement, so the budget does not count them twice
(as a claim released and as free space not yet re-measured) nor not at all. A store that cannot
say how much room it has (``free_bytes()`` is None, e.g. PostgreSQL) has no budget.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

MEASURE_INTERVAL = 1.0  # seconds between statvfs calls
WARN_INTERVAL = 60.0  # seconds between two log lines about an exhausted budget


class DiskBudget:
    """Free bytes on the spool's disk, ``min_free_space`` and the claims of sessions."""

    def __init__(self, measure: Callable[[], int | None], min_free_space: int) -> None:
        self._measure = measure
        self.min_free_space = min_free_space
        self.claimed = 0
        self._free: int | None = None
        self._measured_at = float("-inf")
        self._warned_at = float("-inf")

    def room(self) -> int | None:
        """Bytes that may still be claimed (negative when over budget); None: no budget."""
        now = time.monotonic()
        if now - self._measured_at >= MEASURE_INTERVAL:
            self._free = self._measure()
            self._measured_at = now
        if self._free is None:
            return None
        return self._free - self.min_free_space - self.claimed

    def claim(self, size: int = 0) -> Claim | None:
        """A claim of ``size`` bytes (SIZE= at MAIL FROM, or 0), or None when there is no room."""
        room = self.room()
        if room is not None and room < size:
            self._warn(size, room)
            return None
        self.claimed += size
        return Claim(self, size)

    def _grow(self, claim: Claim, total: int) -> bool:
        extra = total - claim.amount
        if extra <= 0:
            return True
        room = self.room()
        if room is not None and room < extra:
            self._warn(extra, room)
            return False
        self.claimed += extra
        claim.amount = total
        return True

    def _release(self, claim: Claim, stored: bool) -> None:
        self.claimed -= claim.amount
        if stored and self._free is not None:
            self._free -= claim.amount  # now in the store; the next measurement shows it
        claim.amount = 0

    def _warn(self, wanted: int, room: int) -> None:
        now = time.monotonic()
        if now - self._warned_at < WARN_INTERVAL:
            return
        self._warned_at = now
        log.warning(
            "spool disk nearly full: %d bytes of mail wanted, %d left above [store] "
            "min_free_space (%d bytes, with %d bytes of DATA in flight); answering 452 4.3.1 "
            "until space is freed: free disk space, deliver or delete queued mail, or lower "
            "min_free_space",
            wanted,
            max(room, 0),
            self.min_free_space,
            self.claimed,
        )


class Claim:
    """What one transaction holds of the budget: max(SIZE=, bytes of DATA received so far)."""

    __slots__ = ("_budget", "amount")

    def __init__(self, budget: DiskBudget, amount: int) -> None:
        self._budget = budget
        self.amount = amount

    def grow_to(self, total: int) -> bool:
        """Cover ``total`` bytes of DATA; False (and unchanged) when that is over budget."""
        return total <= self.amount or self._budget._grow(self, total)

    def release(self, *, stored: bool = False) -> None:
        """The transaction is over; ``stored``: its bytes are now in the store."""
        if self.amount:
            self._budget._release(self, stored)
