"""Recipient counters: what both stores share to answer ``status`` in O(domains).

The counters themselves are kept by SQL triggers on ``recipients`` (migrations
sqlite/0006_recipient_counts.sql and postgres/0003_recipient_counts.sql), keyed by
(domain, state, released). This module turns them into :class:`DomainStatus` rows (deriving
*held* from the domain's mode) and compares them with a recount for ``mxspool check store``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from mxspool.store.base import CounterDrift, DomainMode, DomainStatus

CountRow = tuple[str, str, bool, int]
"""(domain, state, released, number of rows)."""

RECOUNT_SQL = (
    "SELECT domain, state, released, count(*) FROM recipients GROUP BY domain, state, released"
)
"""The truth the counters must equal (a full scan: for ``check store`` only)."""

OLDEST_WINDOW = 64
"""Unfinished rows read per domain, in arrival (id) order, to find the oldest one.

Recipient ids grow with arrival, so the oldest unfinished row is among the first; a small
window absorbs messages committed out of order by concurrent sessions, at O(log n) per domain.
"""


def shown_state(state: str, released: bool, mode: DomainMode | None) -> str:
    """The state an operator sees: pending rows of a holding domain are *held*, unless the
    operator released them one by one (canaries)."""
    if state == "pending" and not released and mode is DomainMode.HOLD:
        return "held"
    return state


def statuses(
    modes: Mapping[str, DomainMode],
    counts: Iterable[CountRow],
    oldest: Mapping[str, float],
    recent: Mapping[str, int],
    now: float,
) -> list[DomainStatus]:
    """One :class:`DomainStatus` per configured domain and per domain that has rows."""
    buckets: dict[str, dict[str, int]] = {name: {} for name in modes}
    for domain, state, released, number in counts:
        if not number:
            continue
        bucket = buckets.setdefault(domain, {})
        shown = shown_state(state, bool(released), modes.get(domain))
        bucket[shown] = bucket.get(shown, 0) + int(number)
    result = []
    for name in sorted(buckets):
        bucket = buckets[name]
        first = oldest.get(name)
        result.append(
            DomainStatus(
                domain=name,
                mode=modes.get(name, DomainMode.RELAY),
                held=bucket.get("held", 0),
                pending=bucket.get("pending", 0),
                delivering=bucket.get("delivering", 0),
                delivered=bucket.get("delivered", 0),
                parked=bucket.get("parked", 0),
                bounced=bucket.get("bounced", 0),
                discarded=bucket.get("discarded", 0),
                oldest_pending_age_s=None if first is None else max(0.0, now - first),
                delivered_last_minute=recent.get(name, 0),
            )
        )
    return result


def unfinished_domains(counts: Iterable[CountRow]) -> list[str]:
    """Domains with pending or delivering rows: the only ones with an oldest age."""
    return sorted(
        {domain for domain, state, _, n in counts if n and state in ("pending", "delivering")}
    )


def delivered_domains(counts: Iterable[CountRow]) -> list[str]:
    """Domains with delivered rows: the only ones that can have delivered in the last minute."""
    return sorted({domain for domain, state, _, n in counts if n and state == "delivered"})


def drift(counted: Iterable[CountRow], actual: Iterable[CountRow]) -> list[CounterDrift]:
    """Every key where the counters and the recount disagree (zero counters match no rows)."""
    stored = {(d, s, bool(r)): int(n) for d, s, r, n in counted}
    truth = {(d, s, bool(r)): int(n) for d, s, r, n in actual}
    return [
        CounterDrift(domain, state, released, stored.get(key, 0), truth.get(key, 0))
        for key in sorted(stored.keys() | truth.keys())
        for domain, state, released in (key,)
        if stored.get(key, 0) != truth.get(key, 0)
    ]
