"""Draining one destination: up to ``concurrency`` workers, one SMTP session each, paced.

Theory of operation
-------------------
The scheduler starts a ``Drain`` for a domain when the store says it has due mail, and starts
another only after this one has finished. In a drain, one feeder claims due recipients in
batches (leased, oldest first, at most ``claim_limit`` recipients, so a release of a million
messages never holds more than a batch) and hands them, one message at a time, through a small
queue to the workers. A worker is started whenever a message waits and no worker is idle, up to
the domain's concurrency: one relayed message costs one connection, a backlog fans out at once.

A worker keeps one SMTP session and reuses it for message after message. Each transaction first
takes a token from the destination's bucket, shared by all its workers. Each message's outcomes
are recorded as soon as its final reply is in: a row is ``delivered`` only after the next hop's
250. A feeder that finds nothing due ends the drain once the workers have emptied the queue.

Failures: a reply is a per-recipient result (see ``outcomes``). A broken session costs only the
message in flight (deferred); the next message reconnects. When no hop can be reached and no
other worker has a session, the destination is "dead" for this drain: what is queued is deferred
without trying, instead of timing out message after message. When other workers do have
sessions (the hop's connection limit, say), the worker gives its message back and stops. The
domain is re-read twice a second, so a ``hold`` stops the drain after the messages in flight and
gives the rest back, and a new ``--rate`` applies at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from mxspool import metrics
from mxspool.delivery import outcomes
from mxspool.delivery.errors import ConnectFailed, ConnectionLost, DeliveryError, RoutingError
from mxspool.delivery.leases import LeaseKeeper, give_back, recipient_ids
from mxspool.delivery.outcomes import AttemptContext, RetryPolicy
from mxspool.delivery.pacing import TokenBucket
from mxspool.delivery.routing import Router
from mxspool.delivery.transport import Connector, Session, Transaction, open_any
from mxspool.envelope import Recipient
from mxspool.store.base import (
    ClaimedRecipient,
    DeliveryJob,
    Domain,
    DomainMode,
    RecipientOutcome,
    Store,
    StoreError,
)

log = logging.getLogger(__name__)

MAX_RECIPIENTS_PER_TRANSACTION = 200
"""Exchange Online's limit per message; larger recipient lists are split."""
CLAIM_LIMIT = 200
"""Recipients per claim: small enough to bound memory and leases, large enough that a message
with up to 200 recipients goes out as one transaction."""
LEASE_SECONDS = 30.0
"""A killed node's claims come back after this; renewed every third of it while working."""
DOMAIN_REFRESH = 0.5


@dataclass(frozen=True, slots=True)
class DrainSettings:
    owner: str
    concurrency: int
    default_rate: float
    policy: RetryPolicy
    lease_seconds: float = LEASE_SECONDS
    claim_limit: int = CLAIM_LIMIT


class _DomainGone(Exception):
    pass


class _GiveUp(Exception):
    """This worker stops; the message it holds goes back to the queue, due now."""


class _Worker:
    """A worker's one session, reused across messages, and its result being recorded."""

    def __init__(self) -> None:
        self.session: Session | None = None
        self.recording: asyncio.Task[None] | None = None
        """At most one: the next message goes out while the last one's results commit."""


class Drain:
    """Delivers what is due for one domain, then returns."""

    def __init__(
        self,
        name: str,
        store: Store,
        router: Router,
        connector: Connector,
        settings: DrainSettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self._store = store
        self._router = router
        self._connector = connector
        self._settings = settings
        self._clock = clock
        self._bucket = TokenBucket(settings.default_rate)
        self._domain: Domain | None = None
        self._domain_read_at = 0.0
        lease = settings.lease_seconds
        self._leases = LeaseKeeper(store, settings.owner, lease, lease / 3)
        self._queue: asyncio.Queue[tuple[DeliveryJob, DomainMode] | None] = asyncio.Queue(
            maxsize=max(1, settings.concurrency)
        )
        self._workers = 0
        self._idle = 0
        self._live_sessions = 0
        self._dead: str | None = None
        self._stop_claiming = False
        self._group: asyncio.TaskGroup | None = None

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                group.create_task(self._feed(), name=f"claim-{self.name}")
        except BaseException:
            # Cancelled (shutdown) or a bug: hand the claims back now, not at lease expiry.
            await self._give_back_on_exit()
            raise
        finally:
            self._group = None
            await self._leases.stop()

    def _spawn(self) -> None:
        if self._group is not None and self._workers < self._settings.concurrency:
            self._workers += 1
            self._group.create_task(self._run_worker(), name=f"deliver-{self.name}")

    async def _current_domain(self) -> Domain:
        """The domain as the store has it, re-read at most twice a second."""
        now = time.monotonic()
        if self._domain is None or now - self._domain_read_at >= DOMAIN_REFRESH:
            self._domain_read_at = now
            domain = await self._store.get_domain(self.name)
            if domain is None:
                raise _DomainGone(self.name)
            self._domain = domain
            rate = domain.rate if domain.rate is not None else self._settings.default_rate
            if rate != self._bucket.rate:
                self._bucket.set_rate(rate)
        return self._domain

    async def _give_back_on_exit(self) -> None:
        ids = sorted(self._leases.outstanding)
        if ids:
            # Shutting down: hand the claims back now rather than after the leases expire.
            with contextlib.suppress(StoreError, TimeoutError):
                async with asyncio.timeout(5.0):
                    await asyncio.shield(self._store.release_claims(self._settings.owner, ids))

    # -- the feeder -----------------------------------------------------------------------------
    async def _feed(self) -> None:
        try:
            await self._claim_until_empty()
        except _DomainGone:
            log.info("domain %s was removed; its claimed mail stays in the store", self.name)
        except StoreError as exc:
            log.warning("delivery to %s paused: cannot claim mail: %s", self.name, exc)
        # Not in a finally: when cancelled, the workers are cancelled too and nobody would
        # take these from a full queue.
        for _ in range(self._workers):
            await self._queue.put(None)

    async def _claim_until_empty(self) -> None:
        settings = self._settings
        while not self._stop_claiming and self._dead is None:
            mode = (await self._current_domain()).mode
            # Store writes are shielded: once asked, a claim or a result is committed even if
            # this task is cancelled meanwhile (and the store's writer never sees a cancelled
            # future).
            jobs = await asyncio.shield(
                self._store.claim_due(
                    settings.owner,
                    self._clock(),
                    settings.lease_seconds,
                    settings.claim_limit,
                    self.name,
                )
            )
            if not jobs:
                return
            self._leases.hold(jobs)
            for job in jobs:
                if self._idle == 0 or self._workers == 0:
                    self._spawn()
                await self._queue.put((job, mode))

    # -- a worker -------------------------------------------------------------------------------
    async def _run_worker(self) -> None:
        worker = _Worker()
        try:
            await self._work(worker)
        except _DomainGone:
            self._stop_claiming = True
        except Exception:
            # Claimed rows stay leased and come back when the lease expires: never lost.
            log.exception("delivery worker for %s failed", self.name)
        finally:
            if worker.recording is not None:
                await worker.recording
            await self._drop_session(worker)
            self._workers -= 1
            if self._workers == 0 and self._group is not None:
                # Never leave the feeder waiting on a full queue with nobody to take from it.
                self._drain_queue_later()

    def _drain_queue_later(self) -> None:
        if not self._queue.empty() and not self._cancelling():
            self._spawn()

    def _cancelling(self) -> bool:
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0

    async def _work(self, worker: _Worker) -> None:
        while True:
            self._idle += 1
            try:
                item = await self._queue.get()
            finally:
                self._idle -= 1
            if item is None:
                return
            job, claimed_in = item
            domain = await self._current_domain()
            if domain.mode is DomainMode.HOLD and claimed_in is DomainMode.RELAY:
                # Put on hold mid-drain. (A batch claimed while the domain held is all
                # canaries, which go.) Canary rows given back are claimable again at once.
                self._stop_claiming = True
                await self._return([job], "not attempted: domain put on hold", 0.0)
                continue
            if self._dead is not None:
                due = self._clock() + self._settings.policy.delay(0)
                await self._return([job], self._dead, due)
                continue
            try:
                results = await self._deliver(job, domain, worker)
            except _GiveUp as stop:
                await self._return([job], str(stop), self._clock())
                return
            self._leases.done(outcome.recipient_id for outcome in results)
            if worker.recording is not None:
                await worker.recording
            worker.recording = asyncio.create_task(self._record(results))

    async def _return(self, jobs: list[DeliveryJob], reason: str, due_at: float) -> None:
        ids = recipient_ids(jobs)
        await give_back(self._store, self._settings.owner, ids, reason, due_at)
        self._leases.done(ids)

    async def _record(self, results: list[RecipientOutcome]) -> None:
        try:
            await asyncio.shield(self._store.record_outcomes(self._settings.owner, results))
            metrics.delivery_outcomes(self.name, results)
        except StoreError as exc:
            # Rows stay "delivering" until their lease expires, then go out again: a possible
            # duplicate, never a loss.
            log.error("could not record delivery outcomes for %s: %s", self.name, exc)

    # -- one message --------------------------------------------------------------------------
    async def _deliver(
        self, job: DeliveryJob, domain: Domain, worker: _Worker
    ) -> list[RecipientOutcome]:
        """Send one message (in transactions of at most 200 recipients); its outcomes."""
        results: list[RecipientOutcome] = []
        age_start = max(domain.released_at or 0.0, job.received_at)
        recipients = job.recipients
        for start in range(0, len(recipients), MAX_RECIPIENTS_PER_TRANSACTION):
            chunk = recipients[start : start + MAX_RECIPIENTS_PER_TRANSACTION]
            destination = _describe_route(domain)
            if self._dead is not None:
                results += self._failed(chunk, self._dead, destination, age_start, False)
                continue
            tx = Transaction(
                mail_from=job.mail_from,
                mail_params=job.mail_params,
                recipients=tuple(Recipient(r.address, r.params) for r in chunk),
                size=job.size,
                body=_body_reader(self._store, job.message_id),
            )
            try:
                await self._bucket.acquire()
                session = await self._session(worker, domain)
                destination = str(session.hop)
                started = time.monotonic()
                replies = await session.send(tx)
                metrics.delivery_latency(self.name, time.monotonic() - started)
            except ConnectFailed as exc:  # includes TlsFailed: nothing was sent
                if self._live_sessions == 0:
                    self._dead = str(exc)
                elif not results:
                    raise _GiveUp(f"not attempted: {exc}") from exc
                results += self._failed(chunk, str(exc), destination, age_start, False)
                continue
            except DeliveryError as exc:  # RoutingError, ConnectionLost, Unsupported
                if isinstance(exc, RoutingError) and not exc.permanent:
                    self._dead = str(exc)
                if isinstance(exc, ConnectionLost):
                    await self._drop_session(worker)
                results += self._failed(chunk, str(exc), destination, age_start, exc.permanent)
                continue
            except StoreError as exc:
                await self._drop_session(worker)
                reason = f"could not read the stored message: {exc}"
                results += self._failed(chunk, reason, destination, age_start, False)
                continue
            ctx = self._context(destination, age_start)
            results += [
                outcomes.for_reply(recipient, reply, ctx)
                for recipient, reply in zip(chunk, replies, strict=True)
            ]
        return results

    async def _session(self, worker: _Worker, domain: Domain) -> Session:
        if worker.session is not None and worker.session.usable:
            return worker.session
        await self._drop_session(worker)
        hops = await self._router.hops(domain)
        worker.session = await open_any(self._connector, hops, domain.tls)
        self._live_sessions += 1
        return worker.session

    async def _drop_session(self, worker: _Worker) -> None:
        if worker.session is not None:
            session, worker.session = worker.session, None
            self._live_sessions -= 1
            await session.close()

    def _context(self, destination: str, age_start: float) -> AttemptContext:
        return AttemptContext(destination, self._clock(), age_start, self._settings.policy)

    def _failed(
        self,
        chunk: tuple[ClaimedRecipient, ...],
        reason: str,
        destination: str,
        age_start: float,
        permanent: bool,
    ) -> list[RecipientOutcome]:
        ctx = self._context(destination, age_start)
        return [outcomes.for_failure(r, reason, ctx, permanent=permanent) for r in chunk]


def _body_reader(store: Store, message_id: str) -> Callable[[], AsyncIterator[bytes]]:
    return lambda: store.read_body(message_id)


def _describe_route(domain: Domain) -> str:
    routes = ",".join(str(route) for route in domain.routes) or domain.name
    return f"mx:{routes}" if domain.use_mx else routes
