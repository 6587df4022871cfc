"""When to notify: edges in the store's counters, with hysteresis, so each episode is told once.

``Detector.observe`` is fed one snapshot (every domain's counters from ``store.status``, the
domains, the free space) every few seconds and returns the events that snapshot starts. It
holds no I/O and no clock of its own, so tests can drive it step by step. The rules:

- ``backlog_high``: a domain's held + pending + delivering reaches a threshold; told again
  only after it fell below 90% of it (per threshold: targets may set their own).
- ``parked``: a domain's first parked recipient; told again only after its parked count went
  back to 0 (the operator retried, bounced or discarded them).
- ``release_started``: a domain's ``released_at`` moved forward (``domain release``, from any
  process: the CLI writes the store, serve reads it here). ``release_finished``: after that,
  the domain has nothing held, pending or delivering; with the totals.
- ``disk_low``: free space below the warning level; again only after it rose 10% above it.

The first snapshot sets the baseline: a condition already true then (backlog high, parked,
disk low) is told (a restart must not hide it); a release already under way is followed to its
end, but its start is not told again. Node presence (``node_lost``) is ``presence``'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from mxspool.notify.events import Event, event_id
from mxspool.store.base import Domain, DomainMode, DomainStatus

REARM_BELOW = 0.9
"""backlog_high is told again only after the backlog fell below this share of the threshold."""
DISK_REARM_ABOVE = 1.1


def _size(number: int) -> str:
    return f"{number / 2**20:.0f} MiB"


def backlog(status: DomainStatus) -> int:
    return status.held + status.pending + status.delivering


class Detector:
    def __init__(self, node: str, thresholds: Iterable[int], disk_warning: int) -> None:
        self.node = node
        self.thresholds = sorted(set(thresholds))
        self.disk_warning = disk_warning
        self._high: set[tuple[str, int]] = set()
        self._parked: set[str] = set()
        self._released: dict[str, float] = {}
        self._releasing: dict[str, float] = {}
        self._disk_low = False
        self._started = False
        self._last: dict[str, int] = {}
        """Each domain's backlog at the previous look: what a release found waiting."""

    def observe(
        self,
        statuses: Sequence[DomainStatus],
        domains: Sequence[Domain],
        free_bytes: int | None,
        now: float,
    ) -> list[Event]:
        events: list[Event] = []
        by_name = {status.domain: status for status in statuses}
        events += self._releases(domains, by_name, now)
        for status in statuses:
            events += self._backlog(status, now)
            events += self._parked_events(status, now)
        events += self._disk(free_bytes, now)
        self._started = True
        self._last = {status.domain: backlog(status) for status in statuses}
        return events

    def _backlog(self, status: DomainStatus, now: float) -> list[Event]:
        events = []
        size = backlog(status)
        for threshold in self.thresholds:
            key = (status.domain, threshold)
            if key not in self._high and size >= threshold:
                self._high.add(key)
                events.append(
                    Event(
                        "backlog_high",
                        self.node,
                        f"{status.domain}: {size} recipients waiting (threshold {threshold})",
                        status.domain,
                        {
                            "backlog": size,
                            "threshold": threshold,
                            "held": status.held,
                            "pending": status.pending,
                            "delivering": status.delivering,
                            "oldest_pending_age_s": status.oldest_pending_age_s,
                        },
                        at=now,
                    )
                )
            elif key in self._high and size < threshold * REARM_BELOW:
                self._high.discard(key)
        return events

    def _parked_events(self, status: DomainStatus, now: float) -> list[Event]:
        if status.parked and status.domain not in self._parked:
            self._parked.add(status.domain)
            return [
                Event(
                    "parked",
                    self.node,
                    f"{status.domain}: {status.parked} recipient(s) parked; see "
                    f"'mxspool queue list --domain {status.domain} --state parked'",
                    status.domain,
                    {"parked": status.parked},
                    at=now,
                )
            ]
        if not status.parked:
            self._parked.discard(status.domain)
        return []

    def _releases(
        self, domains: Sequence[Domain], statuses: dict[str, DomainStatus], now: float
    ) -> list[Event]:
        events = []
        names = {domain.name for domain in domains}
        for gone in [name for name in self._releasing if name not in names]:
            del self._releasing[gone]
        for domain in domains:
            at = domain.released_at
            if at is None or domain.mode is not DomainMode.RELAY:
                continue
            status = statuses.get(domain.name)
            if at > self._released.get(domain.name, 0.0):
                self._released[domain.name] = at
                if not self._started:
                    if status is not None and backlog(status):
                        self._releasing[domain.name] = at  # under way: follow it to its end
                    continue
                self._releasing[domain.name] = at
                waiting = max(self._last.get(domain.name, 0), backlog(status) if status else 0)
                events.append(
                    Event(
                        "release_started",
                        self.node,
                        f"{domain.name}: released; {waiting} recipients to deliver",
                        domain.name,
                        {
                            "released_at": at,
                            "to_deliver": waiting,
                        },
                        at=now,
                        id=event_id("release_started", domain.name, at),
                    )
                )
            if domain.name in self._releasing and (status is None or not backlog(status)):
                released = self._releasing.pop(domain.name)
                totals = {
                    "delivered": status.delivered if status else 0,
                    "parked": status.parked if status else 0,
                    "bounced": status.bounced if status else 0,
                    "discarded": status.discarded if status else 0,
                }
                events.append(
                    Event(
                        "release_finished",
                        self.node,
                        f"{domain.name}: release finished: "
                        + ", ".join(f"{value} {key}" for key, value in totals.items()),
                        domain.name,
                        {"released_at": released, "took_s": round(now - released, 1), **totals},
                        at=now,
                        id=event_id("release_finished", domain.name, released),
                    )
                )
        return events

    def _disk(self, free: int | None, now: float) -> list[Event]:
        if free is None or self.disk_warning <= 0:
            return []
        if not self._disk_low and free < self.disk_warning:
            self._disk_low = True
            return [
                Event(
                    "disk_low",
                    self.node,
                    f"{self.node}: {_size(free)} free for the spool, below the warning "
                    f"level {_size(self.disk_warning)}",
                    None,
                    {"free_bytes": free, "warning_bytes": self.disk_warning},
                    at=now,
                )
            ]
        if self._disk_low and free >= self.disk_warning * DISK_REARM_ABOVE:
            self._disk_low = False
        return []
