"""Pacing per destination: a token bucket for the message rate, a gate for concurrency.

The bucket holds at most one token, so a rate of 20/s means one message every 50 ms with no
initial burst: targets such as Exchange Online throttle on short windows, and a release is long
enough that a burst buys nothing. Acquirers reserve their slot (the balance may go negative),
so concurrent workers queue fairly without a lock. A rate of 0 means unpaced.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class TokenBucket:
    def __init__(
        self, rate: float, burst: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._burst = burst
        self._rate = max(0.0, rate)
        self._tokens = burst
        self._updated = clock()

    @property
    def rate(self) -> float:
        return self._rate

    def set_rate(self, rate: float) -> None:
        """Change the rate for later acquisitions (``domain release --rate`` mid-drain)."""
        self._refill()
        self._rate = max(0.0, rate)
        if self._rate == 0.0:
            self._tokens = self._burst

    def _refill(self) -> None:
        now = self._clock()
        if self._rate > 0.0:
            self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
        self._updated = now

    def reserve(self) -> float:
        """Take one token; the seconds to wait before using it (0.0 when available now)."""
        if self._rate <= 0.0:
            return 0.0
        self._refill()
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0.0 else -self._tokens / self._rate

    async def acquire(self) -> None:
        delay = self.reserve()
        if delay > 0.0:
            await asyncio.sleep(delay)


class Pacer:
    """Everything the workers of one destination share: the bucket and the concurrency gate."""

    def __init__(self, rate: float, concurrency: int) -> None:
        self.bucket = TokenBucket(rate)
        self.concurrency = max(1, concurrency)
        self.sessions = asyncio.Semaphore(self.concurrency)
        """Held for the life of each SMTP session to the destination (open to close)."""
