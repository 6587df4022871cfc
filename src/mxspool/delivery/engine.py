"""Draining one destination: up to ``concurrency`` workers, one SMTP session each, paced.

Theory of operation
-------------------
The scheduler starts a ``Drain`` for a domain when the store says it has due mail, and starts
another only after this one has finished. In a drain, one feeder claims due recipients in
batches (leased, oldest first, whole messages chosen by the first ``claim_limit`` recipients,
so a release of a million messages never holds more than a batch, and a message is never cut
between claims) and hands them, one message at a time, through a small
queue to the workers. A worker is started whenever a message waits and no worker is idle, up to
the domain's concurrency: one relayed message costs one connection, a backlog fans out at once.

A worker keeps one SMTP session and reuses it for message after message. Each transaction first
takes a token from the destination's bucket, shared by all its workers. Each message's outcomes
go to the drain's ``OutcomeRecorder`` as soon as its final reply is in, and the worker moves on;
the recorder commits what all workers finished in one store call (a row is ``delivered`` only
after the next hop's 250). A feeder that finds nothing due ends the drain once the workers have
emptied the queue and the recorder has committed the last outcomes.

Failures: a reply is a per-recipient result (see ``outcomes``). A broken session costs only the
message in flight (deferred); the next message reconnects. When no hop can be reached and no
other worker has a session, that is a connection failure of the destination (``health``); after
``dead_after_failures`` in a row it is dead: the drain stops claiming, what it holds is deferred
without trying, and when its workers are done one ``Store.defer_destination`` defers the whole
queue to the next probe (``retry_schedule``, stepped by the probed message's attempts). Until
then a drain started for this domain (new mail) connects nowhere and only defers; at the probe
time one worker tries one connection, and if it opens, the drain fans out over the whole queue,
which is all due at that moment. When other workers do have sessions (the hop's connection
limit, say), the worker gives its message back and stops. The domain is re-read twice a second,
so a ``hold`` stops the drain after the messages in flight and gives the rest back, and a new
``--rate`` applies at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from mxspool import metrics
from mxspool.delivery import authgate, backoff, exchange, outcomes
from mxspool.delivery.arc import ArcSealer
from mxspool.delivery.attemptlog import AttemptTrace, note
from mxspool.delivery.bodies import BodySource
from mxspool.delivery.errors import ConnectFailed, ConnectionLost, DeliveryError, RoutingError
from mxspool.delivery.health import Dead, DestinationHealth
from mxspool.delivery.leases import LeaseKeeper, give_back, recipient_ids
from mxspool.delivery.outcomes import AttemptContext, RetryPolicy
from mxspool.delivery.pacing import LocalPacer, Pacer, SharedPacer
from mxspool.delivery.recorder import OutcomeRecorder
from mxspool.delivery.routing import Router
from mxspool.delivery.sentbytes import OutgoingBody
from mxspool.delivery.tenants import PacingGroup
from mxspool.delivery.transport import Connector, Session, Transaction, open_any
from mxspool.envelope import Recipient
from mxspool.smtp.replies import Reply
from mxspool.store.base import (
    ClaimedRecipient,
    DeliveryJob,
    DestinationDeferral,
    Domain,
    DomainMode,
    RecipientOutcome,
    RecipientState,
    Store,
    StoreError,
)

log = logging.getLogger(__name__)

MAX_RECIPIENTS_PER_TRANSACTION = 200
"""Exchange Online's limit per message; larger recipient lists are split."""
CLAIM_LIMIT = 200
"""Recipients that choose a claim's messages: small enough to bound memory and leases. The
store claims whole messages, so each goes out in as few transactions as the 200 limit allows
(450 recipients: 200 + 200 + 50, one after the other on one session)."""
LEASE_SECONDS = 30.0
"""A killed node's claims come back after this; renewed every third of it while working."""
DOMAIN_REFRESH = 0.5
RATE_WINDOW = 2.0
"""Seconds of recent transactions that give an unpaced destination's rate when throttled."""


@dataclass(frozen=True, slots=True)
class DrainSettings:
    owner: str
    concurrency: int
    default_rate: float
    policy: RetryPolicy
    lease_seconds: float = LEASE_SECONDS
    claim_limit: int = CLAIM_LIMIT
    shared_pacing: bool = False
    """Rate and connection limits through the store, for the whole cluster (PostgreSQL);
    False keeps them in this process (one node: the same limits, no round trips)."""
    dead_after_failures: int = 3
    """Consecutive connection failures that make the destination dead (``health``)."""
    auth_wait: float = 0.0
    """Hold claimed mail up to this long after its arrival until its authentication verdict
    is stored (``authgate``); 0 when the intake does not authenticate."""
    sealer: ArcSealer | None = None
    """Seals every message delivered with an ARC set (``[arc]``); None: sent as stored."""
    per_recipient_hourly_limit: int | None = None
    """Messages an hour per recipient to exchange-online domains (``exchange.RecipientPacer``);
    None: ``exchange.RECIPIENT_PER_HOUR``."""


class _DomainGone(Exception):
    pass


class _GiveUp(Exception):
    """This worker stops; the message it holds goes back to the queue, due now."""


class _Worker:
    """A worker's one session, reused across messages."""

    def __init__(self) -> None:
        self.session: Session | None = None
        self.trace = AttemptTrace()  # for the mail log (delivery.attemptlog)


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
        health: DestinationHealth | None = None,
        clock: Callable[[], float] = time.time,
        group: PacingGroup | None = None,
    ) -> None:
        self.name = name
        self._store = store
        self._router = router
        self._connector = connector
        self._settings = settings
        self._clock = clock
        # ``group``: the domain's target tenant shares one rate with its other domains.
        self._tenant = group
        self._pacer: Pacer = (
            SharedPacer(
                store,
                name,
                settings.default_rate,
                settings.concurrency,
                settings.lease_seconds,
                bucket=group.key if group is not None else None,
            )
            if settings.shared_pacing
            else group.local
            if group is not None
            else LocalPacer(settings.default_rate)
        )
        self._adaptive = backoff.AdaptiveRate()
        self._recipient_pacer = exchange.RecipientPacer(settings.per_recipient_hourly_limit)
        self._starts: deque[float] = deque(maxlen=10_000)
        """Transaction start times of the last RATE_WINDOW seconds (only for exchange-online)."""
        self._free_slots = [f"{settings.owner}/{n}" for n in range(settings.concurrency, 0, -1)]
        self._domain: Domain | None = None
        self._domain_read_at = 0.0
        lease = settings.lease_seconds
        self._leases = LeaseKeeper(store, settings.owner, lease, lease / 3)
        self._recorder = OutcomeRecorder(store, settings.owner, name, self._leases)
        self._fed = False
        self._more_mail = False
        self._bodies = BodySource(store)
        self._queue: asyncio.Queue[tuple[DeliveryJob, DomainMode] | None] = asyncio.Queue(
            maxsize=max(1, settings.concurrency)
        )
        self._workers = 0
        self._idle = 0
        self._live_sessions = 0
        self._health = health or DestinationHealth(settings.dead_after_failures)
        self._dead: Dead | None = None
        """Set once this drain holds the destination for dead: nothing more is attempted."""
        self._defer_all = False
        """When the drain ends, defer the destination's whole queue in one store update."""
        self._worst_attempts = 0
        """The most earlier attempts among recipients whose connection failed: the retry step
        that spaces the next probe."""
        self._stop_claiming = False
        self._group: asyncio.TaskGroup | None = None

    async def run(self) -> None:
        dead = self._health.dead(self.name)
        if dead is not None and self._clock() < dead.until:
            # Dead and its probe not due: whatever was found due (new mail) is deferred too.
            self._dead = dead
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                group.create_task(self._recorder.run(), name=f"record-{self.name}")
                group.create_task(self._feed(), name=f"claim-{self.name}")
        except BaseException:
            # Cancelled (shutdown) or a bug: commit what was delivered, then hand the other
            # claims back now, not at lease expiry.
            with contextlib.suppress(StoreError, TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._recorder.flush()
            await self._give_back_on_exit()
            raise
        else:
            if self._defer_all:
                await self._defer_queue()
        finally:
            self._group = None
            await self._leases.stop()
            await self._pacer.close()

    def more_mail(self) -> None:
        """New mail was notified: claim once more before ending, even if the last claim
        found nothing (it may have run just before the mail was committed)."""
        self._more_mail = True

    def flushed(self) -> None:
        """``queue flush``: try now. Whatever this drain held for dead is forgotten (the
        scheduler cleared ``health``); what it claims next is attempted, not deferred."""
        self._dead = None
        self._defer_all = False
        self._more_mail = True

    def domain_changed(self) -> None:
        """The domain was changed somewhere: re-read it before the next message."""
        self._domain_read_at = -DOMAIN_REFRESH

    def _spawn(self) -> None:
        # Until a session opens, at most a cohort of connection attempts (one probe when
        # the destination is dead): a dead destination costs a few attempts, not one a worker.
        limit = self._health.connections(self.name, self._settings.concurrency)
        if self._group is not None and self._workers < limit:
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
        self._apply_rate(self._domain, now)
        return self._domain

    def _apply_rate(self, domain: Domain, now: float) -> None:
        """The domain's rate, or less while Exchange Online throttles us (its profile)."""
        rate = domain.rate if domain.rate is not None else self._settings.default_rate
        if self._tenant is not None and self._tenant.rate is not None:
            rate = self._tenant.rate  # the target tenant's rate, for all its domains
        if exchange.applies(domain.profile):
            rate = self._adaptive.effective(rate)
        if rate != self._pacer.rate:
            self._pacer.set_rate(rate)

    def _note_throttling(self, domain: Domain, replies: tuple[Reply, ...]) -> None:
        """Every transaction's replies feed the adaptive rate (``backoff``): the share of
        busy replies, not their mere presence, decides."""
        busy = [reply for reply in replies if exchange.is_throttling(reply)]
        now = time.monotonic()
        # Unpaced: the rate actually seen over the last seconds is the one to cut.
        current = self._pacer.rate or self._recent_rate(now)
        if not self._adaptive.observe(now, len(replies), len(busy), current):
            return
        self._apply_rate(domain, now)
        log.warning(
            "%s is busy (%s); rate now %.2f/s",
            self.name,
            busy[0] if busy else "busy replies",
            self._pacer.rate,
        )

    def _recent_rate(self, now: float) -> float:
        starts = self._starts
        while starts and now - starts[0] > RATE_WINDOW:
            starts.popleft()
        return max(backoff.MIN_RATE, len(starts) / RATE_WINDOW)

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
        self._fed = True
        self._close_when_done()

    def _close_when_done(self) -> None:
        if self._fed and self._workers == 0:
            self._recorder.close()

    async def _claim_until_empty(self) -> None:
        settings = self._settings
        while not self._stop_claiming:
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
                if self._more_mail:
                    self._more_mail = False
                    continue
                return
            self._more_mail = False
            self._leases.hold(jobs)
            if settings.auth_wait and self._dead is None:
                await authgate.wait_for_verdicts(self._store, jobs, settings.auth_wait, self._clock)
            if self._dead is None:
                await self._bodies.prefetch(jobs)
            for index, job in enumerate(jobs):
                if self._dead is not None:
                    for rest in jobs[index:]:
                        self._defer_unattempted(rest, self._dead)
                    break
                if self._idle == 0 or self._workers == 0:
                    self._spawn()
                await self._queue.put((job, mode))
            if self._dead is not None:
                # The rest of the queue is deferred in one store update when the drain ends:
                # always when this drain found the destination dead (the whole queue is due
                # at a probe), else only when there is more than this batch (a release while
                # dead); new mail trickling in costs its own rows, not a pass over the queue.
                if sum(len(job.recipients) for job in jobs) >= settings.claim_limit:
                    self._defer_all = True
                return

    # -- a worker -------------------------------------------------------------------------------
    async def _run_worker(self) -> None:
        worker = _Worker()
        # A name for this connection's slot; names are reused, so a long drain does not
        # leave a trail of expired slots behind.
        slot = self._free_slots.pop()
        try:
            await self._pacer.enter(slot)
            await self._work(worker)
        except _DomainGone:
            self._stop_claiming = True
        except Exception:
            # Claimed rows stay leased and come back when the lease expires: never lost.
            log.exception("delivery worker for %s failed", self.name)
        finally:
            await self._drop_session(worker)
            await self._pacer.leave(slot)
            self._free_slots.append(slot)
            self._workers -= 1
            if self._workers == 0 and self._group is not None:
                # Never leave the feeder waiting on a full queue with nobody to take from it.
                self._drain_queue_later()
            self._close_when_done()

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
            try:
                if not await self._handle(job, claimed_in, worker):
                    return
            finally:
                self._bodies.forget(job.message_id)

    async def _handle(self, job: DeliveryJob, claimed_in: DomainMode, worker: _Worker) -> bool:
        """Deliver (or give back) one claimed message; False when this worker must stop."""
        domain = await self._current_domain()
        if domain.mode is DomainMode.HOLD and claimed_in is DomainMode.RELAY:
            # Put on hold mid-drain. (A batch claimed while the domain held is all
            # canaries, which go.) Canary rows given back are claimable again at once.
            self._stop_claiming = True
            await self._return([job], "not attempted: domain put on hold", 0.0)
            return True
        if self._dead is not None:
            self._defer_unattempted(job, self._dead)
            return True
        try:
            worker.trace = AttemptTrace()
            results = await self._deliver(job, domain, worker)
        except _GiveUp as stop:
            await self._return([job], str(stop), self._clock())
            return False
        age_start = max(domain.released_at or 0.0, job.received_at)
        self._recorder.add(results, note(job, age_start, results, worker.trace))
        return True

    def _defer_unattempted(self, job: DeliveryJob, dead: Dead) -> None:
        """The destination is dead: this claimed message waits for the probe, unattempted."""
        self._bodies.forget(job.message_id)
        self._recorder.add(
            [outcomes.not_attempted(r, dead.reply, dead.until) for r in job.recipients]
        )

    async def _defer_queue(self) -> None:
        """Defer the dead destination's whole queue to its next probe, in one store update."""
        dead = self._health.dead(self.name)
        if dead is None:
            return  # a session opened meanwhile: alive again, nothing to defer
        try:
            domain = await self._current_domain()
        except _DomainGone:
            return
        policy = self._settings.policy
        now = self._clock()
        deferral = DestinationDeferral(
            until=dead.until,
            reply=dead.reply,
            now=now,
            expire_received_before=outcomes.expiry_cutoff(policy, domain.released_at, now),
            expired_reply=outcomes.expired_reply(policy, dead.reply),
        )
        changed = await asyncio.shield(self._store.defer_destination(self.name, deferral))
        metrics.destination_deferred(self.name, changed)
        if changed:
            log.info("%s: deferred %d recipients: %s", self.name, changed, dead.reply)

    def _connection_failed(self, reason: str, chunk: tuple[ClaimedRecipient, ...]) -> None:
        """No session could be opened and none is open: count it; dead after a few."""
        self._worst_attempts = max(self._worst_attempts, *(r.attempts for r in chunk))
        failures = self._health.failed(self.name)
        if self._dead is not None or not self._health.is_dead_after(failures):
            return
        until = self._clock() + self._settings.policy.delay(self._worst_attempts)
        self._dead = self._health.declare_dead(self.name, reason, failures, until)
        self._defer_all = True
        log.warning("%s: %s", self.name, self._dead.reply)

    async def _return(self, jobs: list[DeliveryJob], reason: str, due_at: float) -> None:
        ids = recipient_ids(jobs)
        await give_back(self._store, self._settings.owner, ids, reason, due_at)
        self._leases.done(ids)

    # -- one message --------------------------------------------------------------------------
    async def _deliver(
        self, job: DeliveryJob, domain: Domain, worker: _Worker
    ) -> list[RecipientOutcome]:
        """Send one message (in transactions of at most 200 recipients); its outcomes."""
        results: list[RecipientOutcome] = []
        age_start = max(domain.released_at or 0.0, job.received_at)
        recipients = job.recipients
        exo = exchange.applies(domain.profile)
        if exo:
            recipients, results = self._admit(job, _describe_route(domain))
        if not recipients or self._dead is not None:
            outgoing = OutgoingBody(self._bodies.reader(job.message_id), job.size)
        else:
            try:
                outgoing = await self._outgoing(job)
            except StoreError as exc:
                reason = f"store error reading the message to seal it: {exc}"
                destination = _describe_route(domain)
                return results + self._failed(recipients, reason, destination, age_start, False)
        for start in range(0, len(recipients), MAX_RECIPIENTS_PER_TRANSACTION):
            chunk = recipients[start : start + MAX_RECIPIENTS_PER_TRANSACTION]
            destination = _describe_route(domain)
            if self._dead is not None:
                dead = self._dead
                results += [outcomes.not_attempted(r, dead.reply, dead.until) for r in chunk]
                continue
            tx = Transaction(
                mail_from=job.mail_from,
                mail_params=job.mail_params,
                recipients=tuple(Recipient(r.address, r.params) for r in chunk),
                size=outgoing.size,
                body=outgoing.read,
            )
            try:
                await self._pacer.acquire()
                asked = time.monotonic()
                session = await self._session(worker, domain)
                destination = str(session.hop)
                started = time.monotonic()
                worker.trace.opened(session, started - asked)
                if exo:
                    self._starts.append(started)
                replies = await session.send(tx)
                metrics.delivery_latency(self.name, time.monotonic() - started)
                worker.trace.transfer = time.monotonic() - started
            except ConnectFailed as exc:  # includes TlsFailed: nothing was sent
                if self._live_sessions == 0:
                    self._connection_failed(str(exc), chunk)
                elif not results:
                    raise _GiveUp(f"not attempted: {exc}") from exc
                results += self._failed(chunk, str(exc), destination, age_start, False)
                continue
            except DeliveryError as exc:  # RoutingError, ConnectionLost, Unsupported
                # A temporary DNS failure with no session open: the destination is unreachable.
                routing = isinstance(exc, RoutingError) and not exc.permanent
                if routing and self._live_sessions == 0:
                    self._connection_failed(str(exc), chunk)
                if isinstance(exc, ConnectionLost):
                    await self._drop_session(worker)
                results += self._failed(chunk, str(exc), destination, age_start, exc.permanent)
                continue
            except StoreError as exc:
                await self._drop_session(worker)
                reason = f"store error during delivery (reading the message or pacing): {exc}"
                results += self._failed(chunk, reason, destination, age_start, False)
                continue
            ctx = self._context(destination, age_start)
            if exo:
                self._note_throttling(domain, replies)
                released = domain.released_at is not None
                done = [
                    exchange.for_reply(recipient, reply, ctx, released)
                    for recipient, reply in zip(chunk, replies, strict=True)
                ]
            else:
                done = [
                    outcomes.for_reply(recipient, reply, ctx)
                    for recipient, reply in zip(chunk, replies, strict=True)
                ]
            results += outgoing.stamp(done)
        return results

    async def _outgoing(self, job: DeliveryJob) -> OutgoingBody:
        """The bytes to send for ``job``: as stored, behind an ARC set when sealing is on."""
        stored = self._bodies.reader(job.message_id)
        sealer = self._settings.sealer
        if sealer is None:
            return OutgoingBody(stored, job.size)
        message = await self._store.get_message(job.message_id)
        seal = await sealer.seal(stored, message.auth_results if message else None)
        return OutgoingBody(stored, job.size, seal.headers if seal else b"")

    def _admit(
        self, job: DeliveryJob, destination: str
    ) -> tuple[tuple[ClaimedRecipient, ...], list[RecipientOutcome]]:
        """Exchange Online's hourly limits per recipient and per sender and recipient: those
        over their budget are deferred to their reserved time, without counting an attempt."""
        now = self._clock()
        admitted: list[ClaimedRecipient] = []
        deferred: list[RecipientOutcome] = []
        per_hour = self._settings.per_recipient_hourly_limit or exchange.RECIPIENT_PER_HOUR
        for recipient in job.recipients:
            at = self._recipient_pacer.admit(recipient.id, job.mail_from, recipient.address, now)
            if at <= 0.0:
                admitted.append(recipient)
                continue
            deferred.append(
                RecipientOutcome(
                    recipient.id,
                    RecipientState.PENDING,
                    f"paced: Exchange Online takes at most {per_hour:,} "
                    f"messages an hour per recipient and {exchange.PAIR_PER_HOUR:,} per sender "
                    "and recipient; not attempted yet",
                    destination,
                    next_attempt_at=at,
                    count_attempt=False,
                )
            )
        return tuple(admitted), deferred

    async def _session(self, worker: _Worker, domain: Domain) -> Session:
        if worker.session is not None and worker.session.usable:
            return worker.session
        await self._drop_session(worker)
        hops = await self._router.hops(domain)
        worker.session = await open_any(self._connector, hops, domain.tls)
        self._live_sessions += 1
        self._health.opened(self.name)
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


def _describe_route(domain: Domain) -> str:
    routes = ",".join(str(route) for route in domain.routes) or domain.name
    return f"mx:{routes}" if domain.use_mx else routes
