"""Pacing shared by the domains of one target tenant.

Exchange Online limits what one tenant accepts, not what each of its domains does: three
domains released together at 600/min each would arrive at 1,800/min and be throttled. So the
domains of migrations with the same target tenant label (``migration create --target-tenant``)
share one pacing bucket, ``tenant:<label>``, at the migration's release rate
(``migration release --rate``; None: each domain's own rate, applied to the shared bucket).

``TenantPacing`` keeps the map domain -> group, re-read from the store's migrations when the
domains generation changes (migration changes bump it), at most once per ``REFRESH`` seconds.
On one node (SQLite) a group is one in-memory ``LocalPacer`` every drain of the tenant uses;
on a cluster each drain's ``SharedPacer`` takes its rate tokens from the store bucket named
after the group (connection slots stay per domain).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mxspool.delivery.pacing import LocalPacer
from mxspool.store.base import Store

REFRESH = 1.0
"""Seconds between looks at the domains generation."""


@dataclass(slots=True)
class PacingGroup:
    key: str
    """The bucket's name: ``tenant:<label>``."""
    rate: float | None = None
    """Messages per second for the whole group; None: each domain's own rate."""
    local: LocalPacer = field(default_factory=lambda: LocalPacer(0.0))
    """The one-node bucket every drain of the group shares."""


class TenantPacing:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._groups: dict[str, PacingGroup] = {}
        self._by_domain: dict[str, PacingGroup] = {}
        self._generation: int | None = None
        self._checked = -REFRESH

    def group(self, domain: str) -> PacingGroup | None:
        return self._by_domain.get(domain)

    async def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < REFRESH:
            return
        self._checked = now
        generation = await self._store.domains_generation()
        if generation == self._generation and not force:
            return
        rates: dict[str, list[float]] = {}
        members: dict[str, list[str]] = {}
        for migration in await self._store.list_migrations():
            if not migration.target_tenant:
                continue
            key = f"tenant:{migration.target_tenant.lower()}"
            members.setdefault(key, []).extend(migration.domains)
            if migration.release_rate is not None:
                rates.setdefault(key, []).append(migration.release_rate)
        by_domain: dict[str, PacingGroup] = {}
        for key, domains in members.items():
            group = self._groups.setdefault(key, PacingGroup(key))
            # Several migrations to one tenant: the slowest rate given holds for all.
            group.rate = min(rates[key]) if key in rates else None
            for domain in domains:
                by_domain[domain] = group
        self._by_domain = by_domain
        self._generation = generation
