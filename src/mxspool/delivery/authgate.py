"""The release gate: a message leaves only once its arrival verdict is stored, or too late.

The intake judges SPF, DKIM and DMARC just after the commit (``intake.auth``), in the
background, and the release seals that verdict with ARC. A message for a relaying domain is
claimed within milliseconds of its commit, usually before its verdict is stored; sent then, it
would leave without one. So the feeder, after each claim, waits until every claimed message
has its verdict (``Store.unauthenticated``), polling from 20 ms up to 250 ms, but never past
``wait`` + ``SLACK`` seconds after the message's arrival.

Why a bound since arrival, while the intake's DNS budget is per message (counted from when its
check starts): normally the check starts at the commit, and a verdict is in within ``wait``
(DNS failures record temperror by then). Under a burst the intake leaves some messages to its
background pass, and a crash leaves some to the next start; their verdicts come later, from
the stored bytes. A relayed message is not held for that: past the bound it leaves without a
verdict (the ARC seal then says so: ``delivery.arc``), logged and counted here
(``mxspool_auth_released_without_verdict_total``), and its verdict is still
stored when it comes. Mail released days after its arrival (the hold-and-migrate case) had
its verdict long before and passes at once, without a query. The claim's leases are renewed
meanwhile; no attempt is counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from mxspool import metrics
from mxspool.store.base import DeliveryJob, Store, StoreError

log = logging.getLogger(__name__)

SLACK = 1.0
"""Seconds beyond the verdict's own bound, for its store write."""
POLL_FIRST = 0.02
POLL_MAX = 0.25


async def wait_for_verdicts(
    store: Store,
    jobs: Sequence[DeliveryJob],
    wait: float,
    clock: Callable[[], float] = time.time,
) -> None:
    """Return once each job's message has a stored verdict or arrived over ``wait`` + SLACK
    seconds ago."""
    now = clock()
    pending = {
        job.message_id: job.received_at + wait + SLACK
        for job in jobs
        if now < job.received_at + wait + SLACK
    }
    interval = POLL_FIRST
    while pending:
        try:
            missing = await store.unauthenticated(list(pending))
        except StoreError as exc:
            log.warning("cannot tell whether claimed mail has its verdict: %s", exc)
            return
        now = clock()
        late = [mid for mid, until in pending.items() if mid in missing and now >= until]
        if late:
            metrics.auth_released_unjudged(len(late))
        for message_id in late:
            log.info(
                "message %s leaves without its arrival verdict: not stored within %gs of its "
                "arrival (the intake is behind; the verdict is stored when it comes)",
                message_id,
                wait + SLACK,
            )
        pending = {mid: until for mid, until in pending.items() if mid in missing and now < until}
        if not pending:
            return
        await asyncio.sleep(min(interval, min(pending.values()) - now))
        interval = min(interval * 2, POLL_MAX)
