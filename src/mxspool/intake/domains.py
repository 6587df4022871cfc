"""The intake's view of the configured domains, kept fresh from the store.

RCPT decisions must not wait on the database, so the listener reads an in-memory table that
a background task reloads whenever the store's domain generation changes (polled twice a
second, so a change made by the CLI is seen well within one second).
"""

from __future__ import annotations

import asyncio
import logging

from mxspool.store.base import Domain, Store, StoreError

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.5


class DomainTable:
    def __init__(self) -> None:
        self.domains: dict[str, Domain] = {}
        self.generation = -1
        self.changed = asyncio.Event()

    def __contains__(self, name: object) -> bool:
        return name in self.domains

    def replace(self, domains: list[Domain], generation: int) -> None:
        self.domains = {domain.name: domain for domain in domains}
        self.generation = generation
        self.changed.set()

    async def refresh(self, store: Store) -> bool:
        """Reload when the store's generation moved; True when something changed."""
        generation = await store.domains_generation()
        if generation == self.generation:
            return False
        self.replace(await store.list_domains(), generation)
        return True

    async def follow(self, store: Store, interval: float = POLL_INTERVAL) -> None:
        """Keep refreshing until cancelled; store errors are logged and retried."""
        while True:
            try:
                await self.refresh(store)
            except StoreError as exc:
                log.warning("could not reload domains from the store: %s", exc)
            await asyncio.sleep(interval)
