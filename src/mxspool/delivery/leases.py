"""Keeping claims alive while a worker holds them, and giving back what it will not attempt.

A claim is a lease: if this process dies, the rows come back to any node when the lease
expires. While the process lives, a small task renews the leases of the rows a worker still
holds, so a slow, paced batch is never taken over by another worker mid-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

from mxspool.store.base import DeliveryJob, RecipientOutcome, RecipientState, Store, StoreError

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews the leases of ``outstanding`` recipient ids every ``every`` seconds."""

    def __init__(self, store: Store, owner: str, lease_seconds: float, every: float) -> None:
        self._store = store
        self._owner = owner
        self._lease = lease_seconds
        self._every = every
        self.outstanding: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    def hold(self, jobs: Iterable[DeliveryJob]) -> None:
        for job in jobs:
            self.outstanding.update(recipient.id for recipient in job.recipients)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._renew(), name="delivery-leases")

    def done(self, recipient_ids: Iterable[int]) -> None:
        self.outstanding.difference_update(recipient_ids)

    async def _renew(self) -> None:
        while self.outstanding:
            await asyncio.sleep(self._every)
            ids = sorted(self.outstanding)
            if not ids:
                return
            try:
                await asyncio.shield(
                    self._store.renew_leases(self._owner, ids, time.time() + self._lease)
                )
            except StoreError as exc:
                # The lease may lapse; then another worker may deliver too (a duplicate, never
                # a loss). Keep trying: the store may be back next time.
                log.warning("could not renew delivery leases: %s", exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def recipient_ids(jobs: Iterable[DeliveryJob]) -> list[int]:
    return [recipient.id for job in jobs for recipient in job.recipients]


async def give_back(
    store: Store, owner: str, ids: Iterable[int], reason: str, due_at: float
) -> None:
    """Return claimed, unattempted recipients to ``pending``, due at ``due_at``, with a reason.

    For a deferral that was not an attempt (a destination known to be down); a plain
    hand-back with nothing to say uses ``Store.release_claims``.
    """
    outcomes = [
        RecipientOutcome(
            rid, RecipientState.PENDING, reason, "", next_attempt_at=due_at, count_attempt=False
        )
        for rid in ids
    ]
    await asyncio.shield(store.record_outcomes(owner, outcomes))
