"""Automatic retention: ``[store] purge_delivered_after`` makes ``serve`` purge once an hour.

The same work as ``mxspool purge --delivered-older-than AGE`` (``operations.purge_delivered``:
bounded batches, audited, ledger rows kept), run by the server so nobody has to install a
timer. It runs once at start, then every ``INTERVAL``; a failure is logged and retried at the
next turn, never fatal to the node. Several nodes on one PostgreSQL store may all run it: each
batch re-checks its messages under a row lock, so a body is dropped (and tagged) once.
"""

from __future__ import annotations

import asyncio
import logging

from mxspool import operations as ops
from mxspool.config import Config
from mxspool.store.base import Store, StoreError

INTERVAL = 3600.0
log = logging.getLogger(__name__)


async def retention_component(config: Config, store: Store, _domains: object = None) -> None:
    """``service.extra_components`` entry: purge hourly when configured; else return."""
    age = config.store.purge_delivered_after
    if not age:
        return
    while True:
        try:
            result = await ops.purge_delivered(store, age, actor="retention")
        except (StoreError, ops.OperationError) as exc:
            log.warning("retention: purge failed (next try in an hour): %s", exc)
        else:
            if result.messages:
                log.info(
                    "retention: dropped the bodies of %d delivered messages (%d bytes)",
                    result.messages,
                    result.bytes,
                )
        await asyncio.sleep(INTERVAL)
