"""The last hour of accept and delivery rates, per minute, for the dashboard's charts.

A sampler reads ``store.status`` every few seconds. Between two samples, the growth of a
domain's recipient rows (all states together) is what was accepted, and the growth of its
``delivered`` count is what was delivered. Reading the store rather than this process's
counters makes the charts right for a whole cluster on one PostgreSQL store and across admin
restarts (after the first sample). Rows that disappear (``domain remove --force``) never count
as negative rates. Nothing is persisted: a restart starts an empty hour.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from mxspool.store.base import DomainStatus, Store, StoreError

log = logging.getLogger(__name__)

MINUTES = 60
SAMPLE_SECONDS = 5.0


@dataclass(slots=True)
class Minute:
    start: int
    """Unix time of the minute's first second."""
    accepted: Counter[str] = field(default_factory=Counter)
    delivered: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class Point:
    start: int
    accepted: int
    delivered: int


def _total(entry: DomainStatus) -> int:
    return (
        entry.held
        + entry.pending
        + entry.delivering
        + entry.delivered
        + entry.parked
        + entry.bounced
        + entry.discarded
    )


class History:
    def __init__(self, minutes: int = MINUTES) -> None:
        self.minutes = minutes
        self._buckets: deque[Minute] = deque(maxlen=minutes)
        self._previous: dict[str, tuple[int, int]] | None = None
        self.latest: list[DomainStatus] = []
        self.latest_at = 0.0

    def add(self, now: float, entries: Sequence[DomainStatus]) -> None:
        """Take one sample of ``store.status``."""
        current = {entry.domain: (_total(entry), entry.delivered) for entry in entries}
        previous = self._previous
        self._previous = current
        self.latest = list(entries)
        self.latest_at = now
        if previous is None:  # the first sample is the baseline
            return
        bucket = self._bucket(int(now // 60 * 60))
        for domain, (total, delivered) in current.items():
            before_total, before_delivered = previous.get(domain, (0, 0))
            if total > before_total:
                bucket.accepted[domain] += total - before_total
            if delivered > before_delivered:
                bucket.delivered[domain] += delivered - before_delivered

    def _bucket(self, start: int) -> Minute:
        if not self._buckets or self._buckets[-1].start < start:
            self._buckets.append(Minute(start))
        return self._buckets[-1]

    def series(self, now: float, domain: str | None = None) -> list[Point]:
        """One point per minute of the last hour, oldest first, the current minute last."""
        by_start = {bucket.start: bucket for bucket in self._buckets}
        last = int(now // 60 * 60)
        points = []
        for start in range(last - (self.minutes - 1) * 60, last + 1, 60):
            bucket = by_start.get(start)
            if bucket is None:
                points.append(Point(start, 0, 0))
            elif domain is None:
                points.append(
                    Point(start, sum(bucket.accepted.values()), sum(bucket.delivered.values()))
                )
            else:
                points.append(Point(start, bucket.accepted[domain], bucket.delivered[domain]))
        return points


async def run_sampler(store: Store, history: History, interval: float = SAMPLE_SECONDS) -> None:
    """Sample the store into ``history`` until cancelled; store errors only skip a sample."""
    while True:
        try:
            now = time.time()
            history.add(now, await store.status(now))
        except StoreError as exc:
            log.warning("dashboard sampler could not read the store status: %s", exc)
        await asyncio.sleep(interval)
