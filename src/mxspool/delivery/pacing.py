"""Pacing per destination: the message rate and the number of connections.

Two implementations of one ``Pacer`` interface, chosen by the store:

- ``LocalPacer`` (one node, SQLite): a token bucket in memory; the drain's own worker count is
  the connection limit. Nothing to share, so no store round trip per message.
- ``SharedPacer`` (several nodes on one PostgreSQL store): the limits hold for the cluster.
  Rate tokens come from the store's bucket ``rate:<destination>`` (``Store.take_tokens``),
  a few at a time to save round trips; connections hold one of ``concurrency`` store slots
  (``Store.acquire_slot``) from before connect until after close, renewed every third of their
  TTL while the worker lives, so the slots of a node that dies expire on their own.

Both hand out tokens no closer than 1/rate apart on each node, so a rate of 20/s means one
message every 50 ms, never a burst: targets such as Exchange Online throttle on short windows,
and a release is long enough that a burst buys nothing. A rate of 0 means unpaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Protocol

from mxspool.store.base import Store, StoreError

log = logging.getLogger(__name__)

SHARED_BATCH_SECONDS = 0.1
"""A node takes this many seconds' worth of shared tokens per store call: few round trips, and
at most about this much of the rate in flight per node (the rate holds within a few percent)."""
MAX_SHARED_BATCH = 50
SLOT_RETRY = (0.05, 1.0)
"""First and longest wait between attempts to get a connection slot from the store."""


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
        """Take one token; the seconds to wait before using it (0.0 when available now).

        The balance may go negative: concurrent acquirers queue fairly without a lock.
        """
        if self._rate <= 0.0:
            return 0.0
        self._refill()
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0.0 else -self._tokens / self._rate

    def available_in(self) -> float:
        """Seconds until one token can be taken without waiting (0.0 when one is there)."""
        if self._rate <= 0.0:
            return 0.0
        self._refill()
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self._rate

    async def acquire(self) -> None:
        delay = self.reserve()
        if delay > 0.0:
            await asyncio.sleep(delay)


class Pacer(Protocol):
    """What a drain's workers share for one destination."""

    @property
    def rate(self) -> float: ...

    def set_rate(self, rate: float) -> None: ...

    async def acquire(self) -> None:
        """Wait for the right to start one more transaction."""

    async def enter(self, slot: str) -> None:
        """Wait for one of the destination's connection slots (named ``slot``)."""

    async def leave(self, slot: str) -> None: ...

    async def close(self) -> None:
        """Give back whatever is still held (end of the drain)."""


class LocalPacer:
    """One node: a token bucket in memory; the drain counts its own connections."""

    def __init__(self, rate: float) -> None:
        self._bucket = TokenBucket(rate)

    @property
    def rate(self) -> float:
        return self._bucket.rate

    def set_rate(self, rate: float) -> None:
        self._bucket.set_rate(rate)

    async def acquire(self) -> None:
        await self._bucket.acquire()

    async def enter(self, slot: str) -> None:
        return None

    async def leave(self, slot: str) -> None:
        return None

    async def close(self) -> None:
        return None


class SharedPacer:
    """Several nodes on one store: rate tokens and connection slots from the store."""

    def __init__(
        self,
        store: Store,
        destination: str,
        rate: float,
        concurrency: int,
        slot_ttl: float,
        *,
        clock: Callable[[], float] = time.time,
        bucket: str | None = None,
    ) -> None:
        self._store = store
        self._destination = destination
        # ``bucket``: a rate shared beyond this destination (a target tenant's domains).
        self._bucket_name = f"rate:{bucket or destination}"
        self._rate = max(0.0, rate)
        self._concurrency = max(1, concurrency)
        self._slot_ttl = slot_ttl
        self._clock = clock
        self._tokens = 0
        self._next_at = 0.0
        self._lock = asyncio.Lock()
        self._slots: set[str] = set()
        self._renewer: asyncio.Task[None] | None = None

    @property
    def rate(self) -> float:
        return self._rate

    def set_rate(self, rate: float) -> None:
        self._rate = max(0.0, rate)

    def _batch(self, rate: float) -> int:
        return max(1, min(MAX_SHARED_BATCH, math.floor(rate * SHARED_BATCH_SECONDS)))

    async def acquire(self) -> None:
        if self._rate <= 0.0:
            return
        # One worker at a time: they queue here as they would for a single bucket.
        async with self._lock:
            wait = self._next_at - time.monotonic()
            if wait > 0.0:
                await asyncio.sleep(wait)
            while self._tokens == 0:
                rate = self._rate
                if rate <= 0.0:
                    return
                want = self._batch(rate)
                # Capacity of two batches: a node that asks a little late loses nothing, and
                # a cold start lets through at most that many early messages cluster-wide.
                got = await self._store.take_tokens(
                    self._bucket_name, rate, 2.0 * want, want, self._clock()
                )
                if got > 0:
                    self._tokens = got
                    break
                # Empty: others took them. By then a batch has refilled (none overflows).
                await asyncio.sleep(want / rate)
            self._tokens -= 1
            rate = self._rate
            now = time.monotonic()
            self._next_at = max(now, self._next_at) + (1.0 / rate if rate > 0.0 else 0.0)

    async def enter(self, slot: str) -> None:
        delay, longest = SLOT_RETRY
        while not await self._store.acquire_slot(
            self._destination, slot, self._concurrency, self._slot_ttl
        ):
            # Jitter: nodes waiting for the same destination do not ask in lockstep.
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(longest, delay * 2)
        self._slots.add(slot)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew(), name=f"slots-{self._destination}")

    async def leave(self, slot: str) -> None:
        self._slots.discard(slot)
        # Shielded: a cancelled worker still gives its slot back (else it waits for the TTL).
        with contextlib.suppress(StoreError):
            await asyncio.shield(self._store.release_slot(self._destination, slot))

    async def _renew(self) -> None:
        while self._slots:
            await asyncio.sleep(self._slot_ttl / 3)
            for slot in list(self._slots):
                try:
                    kept = await self._store.acquire_slot(
                        self._destination, slot, self._concurrency, self._slot_ttl
                    )
                except StoreError as exc:
                    log.warning("could not renew a connection slot for %s: %s", slot, exc)
                    continue
                if not kept:
                    # It expired (a long stall) and others took the limit meanwhile: this
                    # connection is one too many until it ends.
                    log.warning("connection slot %s for %s expired", slot, self._destination)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        for slot in list(self._slots):
            await self.leave(slot)
