"""The intake's view of the configured domains, kept fresh from the store.

RCPT decisions must not wait on the database, so the listener reads an in-memory table that
a background task reloads whenever the store's domain generation changes (polled four times a
second, one small read, so a change made by the CLI is seen well within one second). Recipient lists
(``mxspool recipients import``) and their mailboxes' MaxReceiveSize ride on the same
generation and are kept as one set per domain and one dict, so the RCPT check is a lookup.

Names are kept in comparison form (``mxspool.addresses``): a domain by its A-label,
ASCII-lowercased. A domain configured with ``--subdomains`` also answers for every name under
it, unless that name is configured itself (the nearest configured name wins).
"""

from __future__ import annotations

import asyncio
import logging

from mxspool.addresses import domain_key, parent_domains
from mxspool.store.base import Domain, Store, StoreError

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.25


class DomainTable:
    def __init__(self) -> None:
        self.domains: dict[str, Domain] = {}
        self.recipients: dict[str, frozenset[str]] = {}
        """Addresses (comparison form) per domain that has a recipient list; absent: no list."""
        self.max_sizes: dict[str, int] = {}
        """MaxReceiveSize in bytes of the listed addresses that have one."""
        self.generation = -1
        self.changed = asyncio.Event()
        self._with_subdomains = False

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.find(name) is not None

    def replace(
        self,
        domains: list[Domain],
        generation: int,
        recipients: dict[str, frozenset[str]] | None = None,
        max_sizes: dict[str, int] | None = None,
    ) -> None:
        self.domains = {domain.name: domain for domain in domains}
        self.recipients = dict(recipients or {})
        self.max_sizes = dict(max_sizes or {})
        self._with_subdomains = any(domain.subdomains for domain in domains)
        self.generation = generation
        self.changed.set()

    def find(self, name: str) -> Domain | None:
        """The configured domain that accepts mail for ``name`` (any case, U- or A-label):
        itself, else the nearest parent configured with subdomains; None: not ours."""
        key = domain_key(name)
        if key is None:
            return None
        domain = self.domains.get(key)
        if domain is not None or not self._with_subdomains:
            return domain
        for parent in parent_domains(key):
            domain = self.domains.get(parent)
            if domain is not None:
                return domain if domain.subdomains else None
        return None

    def postmaster_domain(self, hostname: str) -> Domain | None:
        """Where mail to ``<Postmaster>`` (no domain) goes: postmaster@ the configured domain
        that the spooler's hostname is in (``mx.example.net`` -> ``example.net``), else the
        oldest configured domain; None when no domain is configured."""
        key = domain_key(hostname.rstrip("."))
        if key is not None:
            for name in (key, *parent_domains(key)):
                if name in self.domains:
                    return self.domains[name]
        if not self.domains:
            return None
        return min(self.domains.values(), key=lambda domain: (domain.created_at, domain.name))

    async def refresh(self, store: Store) -> bool:
        """Reload when the store's generation moved; True when something changed."""
        generation = await store.domains_generation()
        if generation == self.generation:
            return False
        self.replace(
            await store.list_domains(),
            generation,
            await store.recipient_lists(),
            await store.recipient_max_sizes(),
        )
        return True

    async def follow(self, store: Store, interval: float = POLL_INTERVAL) -> None:
        """Keep refreshing until cancelled; store errors are logged and retried."""
        while True:
            try:
                await self.refresh(store)
            except StoreError as exc:
                log.warning("could not reload domains from the store: %s", exc)
            await asyncio.sleep(interval)
