"""The bytes of claimed messages for delivery: small ones read in bulk when the store can.

Reading a body is a store round trip per message (two on SQLite: find it, read it), which in
a release of small messages costs as much CPU as the SMTP work. So the feeder reads the bodies
of a whole claimed batch that are at most ``SMALL_BODY`` bytes with one
``Store.read_small_bodies`` call; larger ones stream through ``read_body``. Memory stays
bounded: at most one claim batch of small bodies per drain.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence

from mxspool.store.base import DeliveryJob, Store, StoreError

log = logging.getLogger(__name__)

SMALL_BODY = 64 * 1024
"""Largest body read in bulk: a claim batch of 200 holds at most 12.5 MiB this way."""


class BodySource:
    """Where a drain's transactions get their bytes: the bulk-read cache, else the store."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._cache: dict[str, bytes] = {}

    async def prefetch(self, jobs: Sequence[DeliveryJob]) -> None:
        """Read the small bodies of a claimed batch in one call."""
        ids = [job.message_id for job in jobs if 0 < job.size <= SMALL_BODY]
        if not ids:
            return
        try:
            self._cache.update(await self._store.read_small_bodies(ids, SMALL_BODY))
        except StoreError as exc:
            # Not fatal: each transaction reads its own body, and reports its own error.
            log.warning("bulk body read failed, reading one by one: %s", exc)

    def reader(self, message_id: str) -> Callable[[], AsyncIterator[bytes]]:
        """``Transaction.body``: called once per attempt (a message split at 200 recipients
        is several attempts), so the cached bytes stay until ``forget``."""

        def read() -> AsyncIterator[bytes]:
            data = self._cache.get(message_id)
            return self._store.read_body(message_id) if data is None else _once(data)

        return read

    def forget(self, message_id: str) -> None:
        self._cache.pop(message_id, None)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
