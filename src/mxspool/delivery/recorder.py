"""Committing delivery outcomes in batches, shared by all the workers of a drain.

In a release, a commit per message would make the store's transaction rate the ceiling (and
each is an fsync on SQLite). Workers instead hand their outcomes to one ``OutcomeRecorder``
and go on with the next message; its loop commits everything that arrived while the previous
commit was running, in one ``record_outcomes`` call. Batches form by themselves under load and
a lone message is committed at once, so nothing waits on a timer.

Leases stay held (and renewed) until the outcome is committed: a row is never handed back as
"not attempted" while its result is still on its way to the store. A failed commit leaves the
rows ``delivering`` until their lease expires, then they go out again: a possible duplicate,
never a loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from mxspool import metrics
from mxspool.delivery.attemptlog import AttemptNote
from mxspool.delivery.leases import LeaseKeeper
from mxspool.store.base import RecipientOutcome, Store, StoreError

log = logging.getLogger(__name__)

MAX_BATCH = 1000
"""Outcomes per store call: bounds statement size; a release rarely has more in flight."""


class OutcomeRecorder:
    def __init__(self, store: Store, owner: str, domain: str, leases: LeaseKeeper) -> None:
        self._store = store
        self._owner = owner
        self._domain = domain
        self._leases = leases
        self._pending: list[RecipientOutcome] = []
        self._wakeup = asyncio.Event()
        self._closed = False
        self._inflight: asyncio.Task[None] | None = None
        self._notes: dict[int, AttemptNote] = {}  # by the last recipient id of each attempt

    def add(self, outcomes: list[RecipientOutcome], note: AttemptNote | None = None) -> None:
        """Queue one attempt's outcomes for the next commit (never blocks); ``note`` is
        logged once they are committed (delivery.attemptlog)."""
        self._pending += outcomes
        if note is not None:
            self._notes[note.last_id] = note
        self._wakeup.set()

    def close(self) -> None:
        """No more outcomes will come: ``run`` returns once everything is committed."""
        self._closed = True
        self._wakeup.set()

    async def run(self) -> None:
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._commit_next()

    async def flush(self) -> None:
        """Commit what is queued, also when the caller is being cancelled (shutdown)."""
        if self._inflight is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._inflight)
        while self._pending:
            await self._commit_next()

    async def _commit_next(self) -> None:
        batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        # Its own task, shielded: once asked, a result is committed even if this drain is
        # cancelled meanwhile, and ``flush`` can wait for it.
        self._inflight = asyncio.ensure_future(self._commit(batch))
        try:
            await asyncio.shield(self._inflight)
        finally:
            if self._inflight.done():
                self._inflight = None

    async def _commit(self, batch: list[RecipientOutcome]) -> None:
        committed = False
        try:
            await self._store.record_outcomes(self._owner, batch)
        except StoreError as exc:
            # Rows stay "delivering" until their lease expires (no longer renewed), then go
            # out again: a possible duplicate, never a loss.
            log.error("could not record delivery outcomes for %s: %s", self._domain, exc)
        else:
            metrics.delivery_outcomes(self._domain, batch)
            committed = True
        finally:
            self._leases.done(outcome.recipient_id for outcome in batch)
            if self._notes:  # the mail log, after the commit (nothing if it failed)
                for outcome in batch:
                    note = self._notes.pop(outcome.recipient_id, None)
                    if note is not None and committed:
                        note.emit()
