"""The intake's view of the configured domains, kept fresh from the store.

RCPT decisions must not wait on the database, so the listener reads an in-memory table that
a background task reloads whenever the store's domain generation changes (polled twice a
second, so a change made by the CLI is seen well within one second). Recipient lists
(``mxspool recipients import``) ride on the same generation and are kept as one set per domain,
so the RCPT check is a set lookup.
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
        self.recipients: dict[str, frozenset[str]] = {}
        """Lowercased addresses per domain that has a recipient list; absent: no list."""
        self.generation = -1
        self.changed = asyncio.Event()

    def __contains__(self, name: object) -> bool:
        return name in self.domains

    def replace(
        self,
        domains: list[Domain],
        generation: int,
        recipients: dict[str, frozenset[str]] | None = None,
    ) -> None:
        self.domains = {domain.name: domain for domain in domains}
        self.recipients = dict(recipients or {})
        self.generation = generation
        self.changed.set()

    async def refresh(self, store: Store) -> bool:
        """Reload when the store's generation moved; True when something changed."""
        generation = await store.domains_generation()
        if generation == self.generation:
            return False
        self.replace(await store.list_domains(), generation, await store.recipient_lists())
        return True

    async def follow(self, store: Store, interval: float = POLL_INTERVAL) -> None:
        """Keep refreshing until cancelled; store errors are logged and retried."""
        while True:
            try:
                await self.refresh(store)
            except StoreError as exc:
                log.warning("could not reload domains from the store: %s", exc)
            await asyncio.sleep(interval)
