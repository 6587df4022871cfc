"""Queues and retries per target, so that a slow or dead receiver never holds anything up.

``put`` never waits and never fails: each target has a bounded deque (``[notifications]
queue_size``) drained by its own task, one event at a time, in order. When the deque is full
the oldest waiting event is dropped, logged and counted (``mxspool_notifications{result=
"dropped"}``): news of now is worth more than news of an hour ago. Intake and delivery never
touch this module; the detector only calls ``put``.

Retries: after a failed attempt that may succeed later (see each target), the task waits
``backoff`` doubled per failure (at most 5 minutes) and tries again, until ``max_attempts``
attempts or ``give_up_after`` seconds since the first one; then the event is given up (logged,
counted as failed). Events behind it wait meanwhile: a receiver that is down gets them all, in
order, once it is back (or loses the oldest ones once the queue is full).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from mxspool import metrics
from mxspool.notify.events import Event
from mxspool.notify.targets import SendFailed, Target

log = logging.getLogger("mxspool.notify")


@dataclass(frozen=True, slots=True)
class Outcome:
    """How sending one event to one target ended."""

    target: str
    ok: bool
    attempts: int
    text: str


async def send_with_retries(target: Target, event: Event) -> Outcome:
    """Send ``event`` to ``target`` per its retry policy; never raises (except cancellation)."""
    policy = target.policy
    started = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        try:
            text = await target.attempt(event)
        except SendFailed as exc:
            failure = str(exc)
            retry = exc.retry
        except Exception as exc:  # a bug or an unexpected library error: log, do not die
            log.exception("notification %s to %s failed unexpectedly", event.id, target.name)
            failure, retry = f"unexpected error: {exc}", True
        else:
            return Outcome(target.name, True, attempts, text)
        wait = policy.delay(attempts)
        late = time.monotonic() - started + wait > policy.give_up_after
        if not retry or attempts >= policy.max_attempts or late:
            why = "not retried" if not retry else f"gave up after {attempts} attempts"
            return Outcome(target.name, False, attempts, f"{failure} ({why})")
        log.warning(
            "notification %s (%s) to %s failed: %s; retrying in %g s",
            event.id,
            event.event,
            target.name,
            failure,
            wait,
        )
        metrics.notification_retry(target.name)
        await asyncio.sleep(wait)


class _Lane:
    """One target's queue and the task that drains it."""

    def __init__(self, target: Target, size: int) -> None:
        self.target = target
        self.queue: deque[Event] = deque()
        self.size = size
        self.wake = asyncio.Event()
        self.busy = False

    def put(self, event: Event) -> None:
        if len(self.queue) >= self.size:
            dropped = self.queue.popleft()
            metrics.notification(self.target.name, "dropped")
            log.warning(
                "notification queue of %s is full (%d waiting): dropped the oldest, %s (%s %s)",
                self.target.name,
                self.size,
                dropped.id,
                dropped.event,
                dropped.domain or "",
            )
        self.queue.append(event)
        self.wake.set()

    async def run(self) -> None:
        while True:
            while not self.queue:
                self.wake.clear()
                await self.wake.wait()
            event = self.queue.popleft()
            self.busy = True
            try:
                outcome = await send_with_retries(self.target, event)
            finally:
                self.busy = False
            if outcome.ok:
                metrics.notification(self.target.name, "sent")
                log.info(
                    "notification %s (%s %s) sent to %s after %d attempt(s): %s",
                    event.id,
                    event.event,
                    event.domain or "",
                    self.target.name,
                    outcome.attempts,
                    outcome.text,
                )
            else:
                metrics.notification(self.target.name, "failed")
                log.error(
                    "notification %s (%s %s) to %s failed: %s; check the target with "
                    "'mxspool notify test'",
                    event.id,
                    event.event,
                    event.domain or "",
                    self.target.name,
                    outcome.text,
                )


class Dispatcher:
    """Every target's lane; ``start`` inside a running loop, ``close`` to stop."""

    def __init__(self, targets: Sequence[Target], queue_size: int) -> None:
        self.lanes = [_Lane(target, queue_size) for target in targets]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for lane in self.lanes:
            name = f"notify:{lane.target.name}"
            self._tasks.append(asyncio.create_task(lane.run(), name=name))

    def put(self, event: Event) -> None:
        """Queue ``event`` for every target that wants it; never blocks."""
        for lane in self.lanes:
            if lane.target.wants(event):
                lane.put(event)

    def idle(self) -> bool:
        return all(not lane.queue and not lane.busy for lane in self.lanes)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for lane in self.lanes:
            with contextlib.suppress(Exception):
                await lane.target.close()
