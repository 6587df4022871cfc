"""Authentication at arrival: SPF, DKIM and DMARC of every accepted message, stored with it.

Why: held mail reaches its target days after it was signed, from the spooler's address. SPF no
longer aligns there, and short-lived DKIM signatures (``x=``) may have expired. So the verdicts
are taken as the message arrives and stored with it (``Store.set_authentication``: the
Authentication-Results value in ``messages.auth_results``, and the tags ``spf=``, ``dkim=``,
``dmarc=``); the release seals them with ARC. Nothing is refused on a verdict, and the stored
bytes are never changed.

Where it runs, and what it costs the intake:

- MAIL FROM: the SPF check starts in a thread (``intake.spf``), while DATA arrives.
- The commit: the 250 goes out first; then the message goes to a verification worker PROCESS
  (``intake.authpool``, ``intake.authwork``), which runs DKIM verification and reads the DMARC
  record: dkimpy's parsing and canonicalization are pure Python, ~0.5 ms a 10 KiB message
  (~1.4 ms at 100 KiB), and in a thread they took the GIL from the event loop that accepts
  mail. On a SQLite or PostgreSQL store only the message's id goes: the worker reads the
  committed bytes from the store itself (its own read-only SQLite connection, or its own
  PostgreSQL connection) and resolves the names the message needs with its own cache, so no
  message byte passes through the intake (pickling, the executor's threads, a pipe: that cost
  ~0.1-0.3 ms of serve's CPU a message). For any other store the intake sends the bytes it
  still holds (memory, or its spill file, whose ownership passes here) with the records of the
  names needed (``authcheck.names_needed``, ~10 us; cached here per TTL; a name not cached,
  or a spilled body, gives the message its own task, which resolves them in a thread). The
  messages submitted in one turn of the event loop go to the workers together
  (``_dispatch``) and one task collects their verdicts. The workers run under SCHED_IDLE
  (``authwork.lower_priority``), and when only ids go the messages wait here while more keep
  arriving (``WorkerPool.arrived``, ``WorkerPool.wait``: ``authpool.IDLE_GAP``, at most half
  of ``timeout``), and only then get their jobs: a burst of mail is accepted
  first, at the rate it has with authentication off, and the verdicts follow right after it
  (``bench/accept.py``: ~3 s after a 5000-message burst). (Where bytes are sent they would
  wait here, and beyond ``max_in_flight`` go to the background pass: there the workers only
  have SCHED_IDLE.)
  Back here, SPF's result is collected (a cached one costs nothing), DMARC aligned
  (microseconds), and the verdicts written in one store transaction per ``WRITE_DELAY``
  (``set_authentications``; the Authentication-Results value formatted once per distinct
  verdict, ``authcheck.HEADER_CACHE``). The 250 never waits on any of it. Cost to the intake:
  ~0.1 ms of serve's CPU a message (10 or 100 KiB, DKIM-signed), plus the worker's time.
- DNS budget: ``timeout`` seconds of DNS time per message (the names before the worker, SPF on
  its own from MAIL FROM), counted from when its check starts, not from its arrival: a backlog
  never turns into temperror. ``temperror`` means DNS trouble (or a worker that died twice on
  the message), nothing else.
- Overload: at most ``max_in_flight`` messages are being checked (their bytes held here; on
  SQLite and PostgreSQL only their ids, so ``IDS_PER_MESSAGE`` times as many). A message
  beyond that is not judged now: its verdict stays empty (NULL) and a background pass
  (``run``) picks such messages up from the store, oldest first, in batches of
  ``CATCH_UP_BATCH`` (their envelopes read concurrently; on PostgreSQL bodies up to
  ``SMALL_READ`` in one query), as soon as the
  checks in flight are down to half the limit; from the start, alongside the recovery's wait.
  The same pass runs every ``SWEEP_INTERVAL`` seconds (a verdict whose write failed) and,
  once, ``timeout`` after start: what a crash or shutdown left without a verdict. That one
  reaches back to this node's mark in the store (``Store.mark_unjudged``, a ``meta`` row per
  node): where the verdicts it may owe begin. It is set at start (an older one stays) and,
  once that recovery is done, moved up to the oldest message still being checked or left to
  the pass, at the end of each pass (at most ``SWEEP_INTERVAL`` apart): so a crash in the
  middle of a long burst, or a restart while other nodes keep accepting, leaves nothing
  unjudged however many messages arrived since. A node serving with authentication off
  forgets its mark (``forget_owed``): mail it accepts then is never judged late. A node that
  is gone for good (no running node holds its name: ``store.nodename``) or was renamed leaves
  a mark no one moves: each recovery, and a look every ``ADOPT_INTERVAL`` seconds, takes such
  marks over (``Store.adopt_unjudged``: this node's mark moves down to theirs) and judges
  what they owed.
- Sustained overload trade-off: a message waits half of ``timeout`` at most for a pause in
  the arrivals; under SCHED_IDLE the workers may still get no CPU while the intake is saturated;
  then verdicts wait, and mail for a relaying domain leaves ``timeout`` (plus a second) after
  its arrival without one (``delivery.authgate`` logs each; the ARC seal says
  so; its verdict is stored when it comes). Held mail is unaffected.
  It looks at the newest ``queries.RECENT_SCAN`` messages, and back to the first message this
  process left without a verdict when that is older (a burst that deferred more than that
  window holds: before, the oldest of them were never judged), and leaves the last ``GRACE``
  seconds' arrivals to the node that took them (several nodes on one store: at worst a message
  is judged twice, to the same verdict).
- Before release: delivery sends a relayed message once its verdict is stored, or
  ``timeout`` (plus a second) after its arrival without it (``delivery.authgate``, which logs
  it); the verdict is stored when it comes. Held mail is released long after its verdict.

Internal clients (loopback, private addresses) are not SPF-checked unless
``[smtp] spf_check_private``; DKIM and DMARC are evaluated for every message.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import itertools
import logging
import os
import time
from dataclasses import dataclass

from mxspool import metrics
from mxspool.body import BodyBuffer
from mxspool.config import Config
from mxspool.intake import authcheck, authdns, authpool, authwork
from mxspool.intake.authcheck import DkimResult, DmarcResult, Verdict
from mxspool.intake.authpool import WorkerFailed, WorkerPool
from mxspool.intake.spf import SpfCheck, SpfChecker
from mxspool.store.base import IncomingMessage, Store, StoredMessage, StoreError
from mxspool.store.queries import UNJUDGED_PROBE
from mxspool.store.sqlite import SqliteStore

log = logging.getLogger(__name__)

TIMEOUT = 10.0
"""Seconds of DNS time a message's check may take (the default of
``[smtp] authentication_timeout``)."""
DNS_THREADS = 8
"""Threads resolving the names of messages whose records are not cached (waiting on DNS)."""
MAX_IN_FLIGHT = 1024
"""Messages being checked at once; beyond this a message is left to the background pass."""
WRITE_DELAY = 0.01
"""Verdicts computed within this many seconds are written together."""
IDS_PER_MESSAGE = 16
"""On a SQLite or PostgreSQL store a message being checked is only its id here until a worker
reads it: that many times ``max_in_flight`` of them may be in flight (a burst waits for its
verdicts here, not in the store for the background pass, which costs the intake more)."""
CATCH_UP_BATCH = 200
"""Messages the background pass reads from the store and checks at a time."""
SWEEP_INTERVAL = 30.0
"""Seconds between background passes when no message was left to them."""
ADOPT_INTERVAL = 300.0
"""Seconds between looks for the marks of nodes that are gone (``Store.adopt_unjudged``)."""
GRACE = 1.0
"""The background pass leaves messages younger than this to the node that took them."""
RECORD_TTL_MAX = 300.0
"""Seconds a resolved record is reused here at most (else its TTL)."""
RECORD_CACHE_SIZE = 8192
SMALL_READ = 1024 * 1024
"""The background pass reads stored messages up to this size together, in one query."""
HEAD_READ = 64 * 1024
"""Bytes of a spilled body read here for its header section (the names it needs)."""


@dataclass(slots=True)
class _Work:
    """One message to check: its bytes, or its spilled body (closed once checked)."""

    message_id: str
    data: bytes | None
    body: BodyBuffer | None
    size: int
    spf_future: concurrent.futures.Future[str] | None
    mail_from: str
    started: float = 0.0


def _readable_by_workers(store: Store) -> str:
    """Where a worker process can read ``store``'s committed messages by id: a SQLite file's
    path, a PostgreSQL URL (the worker opens its own connection); "" when it cannot."""
    if isinstance(store, SqliteStore):
        return str(store.path)
    url = getattr(store, "url", None)
    if isinstance(url, str) and url.startswith(authwork.POSTGRES_SCHEMES):
        return url
    return ""


class Authenticator:
    """Checks every accepted message; see the module docstring."""

    def __init__(
        self,
        store: Store,
        *,
        authserv_id: str,
        resolver: str = "",
        check_private: bool = False,
        timeout: float = TIMEOUT,
        workers: int = 0,
        max_in_flight: int = MAX_IN_FLIGHT,
        nice: int = authwork.NICE,
        node: str = "",
    ) -> None:
        self.store = store
        self.node = node
        """This node's name (``[smtp] hostname``): the key of its mark in the store."""
        self.authserv_id = authserv_id
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.spf = SpfChecker(resolver=resolver, check_private=check_private, timeout=timeout)
        # DMARC alignment runs on the event loop; the public suffix list it needs is parsed
        # here, at start, not at the first verdict, where it stalled every session ~40 ms.
        authcheck.load_suffixes()
        self._nameserver = resolver
        self.pool = WorkerPool(workers, nameserver=resolver, nice=nice, hold_max=timeout / 2)
        self._database = _readable_by_workers(store)
        """A SQLite store's path or a PostgreSQL store's URL: workers read the messages from
        it (``authwork.read_stored``); "" for any other store (the bytes are sent)."""
        self._limit = max_in_flight * (IDS_PER_MESSAGE if self._database else 1)
        """Messages being checked at once, at most (``max_in_flight``, or more when only their
        ids are held here)."""
        self._threads = concurrent.futures.ThreadPoolExecutor(
            DNS_THREADS, thread_name_prefix="auth-dns"
        )
        self._records: dict[str, tuple[float, list[bytes]]] = {}
        self._pending: set[str] = set()
        """Messages being checked or their verdict waiting to be written."""
        self._reads: list[set[str]] = []
        """For each store read of ``catch_up`` in progress, the ids whose verdict was written
        meanwhile: the read may predate the write and still list them as unjudged."""
        self._in_flight = 0
        self._checks: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        self._deferred = asyncio.Event()
        self._last_deferred = 0.0
        """When the last message was left to the background pass (time.time())."""
        self._first_left: str | None = None
        """The first message left without a verdict (deferred, or its verdict's write failed)
        since the background pass last found none: the pass looks back to it, however many
        messages arrived since (``Store.without_authentication``'s ``since``)."""
        self._writes: set[asyncio.Future[None]] = set()
        self._batch: list[tuple[str, Verdict, float]] = []
        self._ready: list[tuple[_Work, authwork.Job | None]] = []
        """Messages whose records were all cached, for the next ``_dispatch``; a message of the
        SQLite store without its job yet (made when it goes)."""
        self._release: asyncio.TimerHandle | None = None
        self._held_since = 0.0
        self._flush_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.recovered = 0
        """Messages the last ``recover`` judged."""
        self.recovery_done = False
        """``recover`` has judged what the last run left: the mark may move on."""
        self._marking = asyncio.Lock()
        """Held by each write of this node's mark: one that takes over another node's mark
        (``_adopt``) is never undone by a move begun before it."""
        self.deferred = 0
        """Messages left to the background pass (too many in flight)."""

    @classmethod
    def from_config(cls, config: Config, store: Store) -> Authenticator | None:
        """None when ``[smtp] authentication`` is off."""
        smtp = config.smtp
        if not smtp.authentication:
            return None
        return cls(
            store,
            authserv_id=smtp.authserv_id or smtp.hostname,
            resolver=config.delivery.resolver,
            check_private=smtp.spf_check_private,
            timeout=smtp.authentication_timeout,
            workers=smtp.authentication_workers,
            max_in_flight=smtp.authentication_max_in_flight,
            node=smtp.hostname,
        )

    # -- the listener's hooks -------------------------------------------------------------
    def start(self, client: str, sender: str, helo: str) -> SpfCheck | None:
        """MAIL FROM accepted: start the SPF check (None when none applies)."""
        return self.spf.start(client, sender, helo)

    def submit(self, message: IncomingMessage, spf_check: SpfCheck | None) -> None:
        """The message is committed (its 250 sent): judge it in the background.

        Takes the message's body: it is closed once read. Call on the event loop.
        """
        body = message.body
        if self._database:  # (with the bytes held here instead, max_in_flight would be hit)
            self.pool.arrived()
        if message.id in self._pending or self._closed:  # the background pass was first
            body.close()
            return
        if self._in_flight >= self._limit:
            body.close()
            self._defer(message.id)
            return
        future = spf_check.future if spf_check is not None else None
        mail_from = message.envelope.mail_from
        if self._database:  # the worker reads the committed bytes: nothing held here
            body.close()
            work = _Work(message.id, None, None, body.size, future, mail_from, time.perf_counter())
            self._ready_stored(work)
            return
        data = body.getvalue()
        if data is not None:
            body.close()  # the bytes stay referenced here; no copy
        spilled = body if data is None else None
        work = _Work(message.id, data, spilled, body.size, future, mail_from, time.perf_counter())
        if data is not None:
            records = self._cached(authcheck.names_needed(data))
            if records is not None:  # the common case: no DNS here, no task of its own
                self._enter(work)
                self._ready.append(
                    (work, authwork.Job(data, None, work.size, records, self.timeout))
                )
                if len(self._ready) == 1:
                    asyncio.get_running_loop().call_soon(self._dispatch)
                return
        self._check(work)

    def _ready_stored(self, work: _Work) -> None:
        """A message of the SQLite store (its id is its job), held here while messages keep
        arriving (``WorkerPool.wait``): during a burst it costs the intake only this."""
        self._enter(work)
        self._ready.append((work, None))
        if self._release is None:
            self._held_since = time.monotonic()
            loop = asyncio.get_running_loop()
            self._release = loop.call_later(authpool.IDLE_GAP, self._release_held)

    def _release_held(self) -> None:
        wait = self.pool.wait(self._held_since)
        if wait > 0:
            self._release = asyncio.get_running_loop().call_later(wait, self._release_held)
            return
        self._release = None
        self._dispatch()

    def _job(self, work: _Work) -> authwork.Job:
        return authwork.Job(
            None, None, work.size, {}, self.timeout, work.message_id, self._database
        )

    def _dispatch(self) -> asyncio.Task[None] | None:
        """The messages submitted since the last call go to the workers together, and one task
        collects their verdicts (a task per message cost the intake more than the rest)."""
        ready, self._ready = self._ready, []
        if not ready:
            return None
        if self._closed:
            for work, _job in ready:
                self._leave(work, stored=False)
            return None
        futures = self.pool.submit([job or self._job(work) for work, job in ready])
        works = [work for work, _job in ready]
        task = asyncio.get_running_loop().create_task(self._judge_batch(works, futures))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)
        return task

    async def _judge_batch(
        self, works: list[_Work], futures: list[asyncio.Future[authwork.Outcome]]
    ) -> None:
        done = 0
        try:
            for work, future in zip(works, futures, strict=True):
                stored = False
                try:
                    try:
                        # Without an await when done (most are, by now): a coroutine a message
                        # was a good part of the intake's cost.
                        outcome = future.result() if future.done() else await future
                        spf_future = work.spf_future
                        if spf_future is None or spf_future.done():
                            spf = self._spf_done(spf_future)
                        else:
                            spf = await self._spf_result(spf_future)
                        verdict = self._combined(work, outcome, spf)
                    except WorkerFailed as exc:
                        if self._closed:
                            continue  # shutting down: judged by the pass at the next start
                        verdict = _temperror(work.mail_from, f"verification failed: {exc}")
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        log.error("authenticating %s failed", work.message_id, exc_info=exc)
                        verdict = _temperror(work.mail_from, f"internal error: {exc}")
                    self._store_verdict(work.message_id, verdict, work.started)
                    stored = True
                finally:
                    done += 1
                    self._leave(work, stored)
        finally:
            for work, future in zip(works[done:], futures[done:], strict=True):
                future.cancel()
                self._leave(work, stored=False)

    def _enter(self, work: _Work) -> None:
        self._pending.add(work.message_id)
        self._in_flight += 1
        self._room.clear()

    def _leave(self, work: _Work, stored: bool) -> None:
        if work.body is not None:
            work.body.close()
        if not stored:
            self._pending.discard(work.message_id)
        self._in_flight -= 1
        if self._in_flight <= self._limit // 2:
            self._room.set()

    def _defer(self, message_id: str) -> None:
        if self.deferred % 1000 == 0:
            log.warning(
                "more than %d messages being authenticated; %s and others get their verdict "
                "from the background pass",
                self._limit,
                message_id,
            )
        self.deferred += 1
        if self._first_left is None:
            self._first_left = message_id
        metrics.auth_deferred()
        self._last_deferred = time.time()
        self._deferred.set()

    def _check(self, work: _Work) -> asyncio.Task[None]:
        """A task for one message (its names not all cached, a spilled body, the pass)."""
        self._enter(work)
        task = asyncio.get_running_loop().create_task(self._judge(work))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)
        return task

    async def _judge(self, work: _Work) -> None:
        message_id, mail_from = work.message_id, work.mail_from
        started = work.started or time.perf_counter()
        stored = False
        try:
            try:
                verdict = await self._verdict(work)
            except WorkerFailed as exc:
                if self._closed:
                    return  # shutting down: judged by the pass at the next start
                verdict = _temperror(mail_from, f"verification failed: {exc}")
            except Exception as exc:
                log.error("authenticating %s failed", message_id, exc_info=exc)
                verdict = _temperror(mail_from, f"internal error: {exc}")
            self._store_verdict(message_id, verdict, started)
            stored = True
        finally:
            self._leave(work, stored)

    async def _verdict(self, work: _Work) -> Verdict:
        """Names resolved here, DKIM and the DMARC record in a worker, SPF, DMARC aligned."""
        loop = asyncio.get_running_loop()
        data, body, path = work.data, work.body, None
        if data is not None:
            names = authcheck.names_needed(data)
            records = self._cached(names)
            if records is None:
                records = await loop.run_in_executor(self._threads, self._resolve, names)
        else:
            assert body is not None and body._file is not None
            path = f"/proc/{os.getpid()}/fd/{body._file.fileno()}"
            records = await loop.run_in_executor(self._threads, self._resolve_spilled, body)
        job = authwork.Job(data, path, work.size, records, self.timeout)
        return await self._combine(work, await self.pool.run(job))

    async def _combine(self, work: _Work, outcome: authwork.Outcome) -> Verdict:
        """The worker's outcome with SPF's result (usually in already): DMARC aligned."""
        return self._combined(work, outcome, await self._spf_result(work.spf_future))

    def _combined(self, work: _Work, outcome: authwork.Outcome, spf: str | None) -> Verdict:
        dmarc = authcheck.dmarc_verdict(outcome.dmarc, spf, work.mail_from, outcome.dkim)
        return Verdict(spf, work.mail_from, outcome.dkim, dmarc)

    async def _spf_result(self, future: concurrent.futures.Future[str] | None) -> str | None:
        if future is None:
            return None
        if not future.done():
            try:  # the check bounds its own DNS time; this is a backstop
                await asyncio.wait_for(asyncio.wrap_future(future), self.timeout + 1.0)
            except (TimeoutError, asyncio.CancelledError, concurrent.futures.CancelledError):
                if self._closed:
                    raise WorkerFailed("shutting down") from None
                return "temperror"
            except Exception:
                return "temperror"
        return self._spf_done(future)

    @staticmethod
    def _spf_done(future: concurrent.futures.Future[str] | None) -> str | None:
        """SPF's result from its finished check."""
        if future is None:
            return None
        if future.cancelled() or future.exception() is not None:
            return "temperror"
        return future.result()

    # -- DNS, before the worker -------------------------------------------------------------
    def _cached(self, names: list[str]) -> authwork.Records | None:
        """Every name's records from the cache here, or None when one is missing (expired)."""
        now = time.monotonic()
        records: authwork.Records = {}
        for name in names:
            entry = self._records.get(name)
            if entry is None or entry[0] < now:
                return None
            records[name] = entry[1]
        return records

    def _resolve(self, names: list[str]) -> authwork.Records:
        """In a thread: each name's records (cached here per TTL), or its DNS error's text;
        ``timeout`` seconds of DNS time in all."""
        deadline = time.monotonic() + self.timeout
        records: authwork.Records = {}
        for name in names:
            entry = self._records.get(name)
            if entry is not None and entry[0] >= time.monotonic():
                records[name] = entry[1]
                continue
            try:
                found, ttl = authdns.txt_ttl(self._nameserver, name, deadline - time.monotonic())
            except authdns.TempError as exc:
                records[name] = str(exc)
                continue
            records[name] = found
            if len(self._records) >= RECORD_CACHE_SIZE:
                self._records.clear()
            self._records[name] = (time.monotonic() + min(ttl, RECORD_TTL_MAX), found)
        return records

    def _resolve_spilled(self, body: BodyBuffer) -> authwork.Records:
        """In a thread: a spilled body's header section (its file flushed for the worker)."""
        head = b"".join(itertools.islice(body.chunks(HEAD_READ), 1))
        return self._resolve(authcheck.names_needed(head))

    # -- back on the loop -------------------------------------------------------------------
    def _store_verdict(self, message_id: str, verdict: Verdict, started: float) -> None:
        """Queue the verdict's write; the queue is written every WRITE_DELAY seconds, in one
        store transaction (``Store.set_authentications``), and counted in the metrics."""
        self._pending.add(message_id)
        self._batch.append((message_id, verdict, time.perf_counter() - started))
        if self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(WRITE_DELAY, self._flush)

    def _flush(self) -> None:
        self._flush_timer = None
        batch, self._batch = self._batch, []
        if not batch:
            return
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for _message_id, verdict, _seconds in batch:
            counts.update(_counted(verdict))
        metrics.auth_verdicts(counts, (seconds for _mid, _verdict, seconds in batch))
        rows = [
            (message_id, verdict.header_value(self.authserv_id), verdict.tags())
            for message_id, verdict, _seconds in batch
        ]
        task = asyncio.ensure_future(self._write(rows))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, rows: list[tuple[str, str, tuple[str, ...]]]) -> None:
        try:
            missing = await self.store.set_authentications(rows)
            if missing:
                log.info(
                    "%d judged messages were gone before their verdict was stored (%s)",
                    len(missing),
                    ", ".join(missing[:5]),
                )
        except StoreError as exc:
            # Not lost: the background pass judges them again.
            if self._first_left is None:
                self._first_left = rows[0][0]
            log.warning(
                "could not store the authentication of %d messages (%s...): %s",
                len(rows),
                rows[0][0],
                exc,
            )
        finally:
            for message_id, _value, _tags in rows:
                self._pending.discard(message_id)
            for written in self._reads:
                written.update(message_id for message_id, _value, _tags in rows)

    async def drain(self) -> None:
        """Write the verdicts computed so far and wait for them (shutdown, tests); after
        ``close``, wait for the worker processes to exit too."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        self._flush()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self._closed:
            await self.pool.stopped()

    # -- the background pass ----------------------------------------------------------------
    async def run(self, started_at: float) -> None:
        """serve's task: mark where this run's verdicts begin, start the workers, ``recover``
        (in its own task: it waits ``timeout`` first), and pick up deferred messages meanwhile
        and after."""
        await self._mark(move=False)
        await self.pool.warm()
        recovery = asyncio.get_running_loop().create_task(self._recoveries(started_at))
        try:
            await self._pick_up_deferred()
        finally:
            recovery.cancel()

    async def _recoveries(self, started_at: float) -> None:
        """``recover`` at the start; then, every ``ADOPT_INTERVAL`` seconds, again when the
        last one failed, or when another node's mark was taken over meanwhile (a node that
        has gone since)."""
        await self.recover(started_at)
        while True:
            await asyncio.sleep(ADOPT_INTERVAL)
            if self.recovery_done and not await self._adopt():
                continue
            await self.recover(time.time())

    async def _pick_up_deferred(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._deferred.wait(), SWEEP_INTERVAL)
                await asyncio.sleep(GRACE)  # the deferred messages become the pass's
            except TimeoutError:
                pass
            while True:
                self._deferred.clear()
                first_left = self._first_left
                before = time.time() - GRACE
                if await self._catch_up_logged(before):
                    continue
                # Nothing left before ``before``; done once that covers the last deferral
                # (a message deferred later is not in this pass's window yet: wait for it).
                if before >= self._last_deferred and not self._deferred.is_set():
                    if self._first_left == first_left:  # (else a write failed meanwhile)
                        self._first_left = None
                    if self.recovery_done:
                        await self._mark(move=True)
                    break
                behind = self._last_deferred + GRACE - time.time()
                await asyncio.sleep(min(max(behind, 0.05), GRACE))

    async def recover(self, started_at: float) -> None:
        """Judge the messages received before ``started_at`` without a verdict (a crash, a
        shutdown): the recent ones, and back to this node's mark, which first takes over the
        marks of nodes that are gone (``_adopt``). Waits ``timeout`` first, so verdicts other
        nodes have in progress land; then the mark may move on."""
        await asyncio.sleep(self.timeout)
        await self._adopt()
        recovered = await self._catch_up_logged(started_at, self.node)
        await self.drain()
        if recovered is None:  # the mark stays: the next start tries again
            return
        self.recovered = recovered
        self.recovery_done = True
        await self._mark(move=True)

    async def _mark(self, *, move: bool) -> None:
        """Note in the store where the verdicts this node owes begin (``Store.mark_unjudged``),
        so that ``recover`` after a crash reaches back to them however many messages arrived
        since (on any node). At the start (``move`` false) an older mark stays; then, once
        ``recover`` is done, the background pass moves it up to the oldest message still
        being checked or left to it: every ``SWEEP_INTERVAL`` seconds at most, and once a
        burst's backlog is judged."""
        async with self._marking:
            if move and not self.recovery_done:  # a mark was taken over meanwhile
                return
            owed = heapq.nsmallest(UNJUDGED_PROBE, self._pending)
            if self._first_left is not None:
                owed.append(self._first_left)
            try:
                await self.store.mark_unjudged(self.node, owed, move=move)
            except StoreError as exc:  # an older mark is only more work for the next start
                log.warning("could not note which messages still await their verdict: %s", exc)

    async def _adopt(self) -> bool:
        """Take over the marks of the nodes that are gone (``Store.adopt_unjudged``), so this
        node's recovery judges what they owed; whether any was. Then this node's mark stays
        put until its next ``recover`` is done."""
        async with self._marking:
            try:
                adopted = await self.store.adopt_unjudged(self.node)
            except StoreError as exc:  # they stay: the next look takes them over
                log.warning("could not look for the marks of nodes that are gone: %s", exc)
                return False
            if adopted:
                self.recovery_done = False
                log.info(
                    "judging what %s owed in arrival verdicts: not running (their marks are "
                    "this node's now)",
                    ", ".join(adopted),
                )
        return bool(adopted)

    async def _catch_up_logged(self, before: float, node: str | None = None) -> int | None:
        """``catch_up``; None (logged) when the store failed."""
        try:
            return await self.catch_up(before, node)
        except StoreError as exc:
            log.warning("could not authenticate messages left without a verdict: %s", exc)
            return None

    async def catch_up(self, before: float, node: str | None = None) -> int:
        """Check the messages received before ``before`` that have no verdict and are not being
        checked here, oldest first, a batch at a time (from ``node``'s mark on too, when
        given); how many. Raises StoreError."""
        total = 0
        checks: list[asyncio.Future[None]] = []
        while not self._closed:
            while self._in_flight > self._limit // 2:
                await self._room.wait()
            limit = CATCH_UP_BATCH + len(self._pending)
            written: set[str] = set()
            self._reads.append(written)
            try:
                ids = await self.store.without_authentication(before, limit, self._first_left, node)
            finally:
                self._reads.remove(written)
            room = max(1, min(CATCH_UP_BATCH, self._limit - self._in_flight))
            fresh = [mid for mid in ids if mid not in self._pending and mid not in written][:room]
            if not fresh:
                break
            if total == 0:
                log.info("authenticating messages left without a verdict, from the store")
            total += await self._check_stored(fresh, checks)
        if checks:
            await asyncio.gather(*checks, return_exceptions=True)
        return total

    async def _check_stored(self, ids: list[str], checks: list[asyncio.Future[None]]) -> int:
        """Start checking stored messages (read together: their envelopes concurrently, the
        small bodies in one query); how many were started. Their checks go to ``checks``."""
        found = await asyncio.gather(*(self.store.get_message(mid) for mid in ids))
        messages = [m for m in found if m is not None]
        if self._database:  # the workers read the bytes
            return self._check_stored_by_id(messages, checks)
        small = await self.store.read_small_bodies([m.id for m in messages], SMALL_READ)
        ready: list[tuple[_Work, authwork.Job | None]] = []
        started = 0
        for message in messages:
            if message.id in self._pending:
                continue
            data = small.get(message.id)
            if data is None:
                data = await self._stored_bytes(message)
                if message.id in self._pending:  # taken by the other pass meanwhile
                    continue
            check = self.spf.start(message.client.address, message.mail_from, message.client.helo)
            future = check.future if check is not None else None
            work = _Work(
                message.id, data, None, message.size, future, message.mail_from, time.perf_counter()
            )
            started += 1
            records = self._cached(authcheck.names_needed(data))
            if records is None:
                checks.append(self._check(work))
                continue
            self._enter(work)
            ready.append((work, authwork.Job(data, None, work.size, records, self.timeout)))
        if ready:
            self._ready.extend(ready)
            batch = self._dispatch()
            if batch is not None:
                checks.append(batch)
        return started

    def _check_stored_by_id(
        self, messages: list[StoredMessage], checks: list[asyncio.Future[None]]
    ) -> int:
        started = 0
        for message in messages:
            if message.id in self._pending:
                continue
            check = self.spf.start(message.client.address, message.mail_from, message.client.helo)
            future = check.future if check is not None else None
            work = _Work(
                message.id, None, None, message.size, future, message.mail_from, time.perf_counter()
            )
            self._enter(work)
            self._ready.append((work, None))
            started += 1
        batch = self._dispatch()
        if batch is not None:
            checks.append(batch)
        return started

    async def _stored_bytes(self, message: StoredMessage) -> bytes:
        """The stored bytes; only the first piece (the header) when too large for DKIM."""
        pieces = []
        async for piece in self.store.read_body(message.id):
            pieces.append(piece)
            if message.size > authcheck.MAX_DKIM_SIZE:
                break
        return b"".join(pieces)

    def close(self) -> None:
        """Stop checking (messages not yet judged get theirs from the pass at the next start);
        ``drain`` then writes what was computed and waits for the workers to exit."""
        self._closed = True
        if self._release is not None:
            self._release.cancel()
            self._release = None
        for task in self._checks:
            task.cancel()
        self.pool.close()
        self._threads.shutdown(wait=False, cancel_futures=True)
        self.spf.close()


async def forget_owed(store: Store, node: str) -> None:
    """serve with authentication off: nothing is owed any more (``Store.clear_unjudged``), so
    turning it on again does not judge the mail accepted meanwhile as if at its arrival."""
    try:
        await store.clear_unjudged(node)
    except StoreError as exc:
        log.warning("could not clear this node's mark of messages awaiting a verdict: %s", exc)


def _temperror(mail_from: str, reason: str) -> Verdict:
    """A verdict when nothing could be checked."""
    return Verdict(
        None,
        mail_from,
        (DkimResult("temperror", reason=reason),),
        DmarcResult("temperror", reason=reason),
    )


def _counted(verdict: Verdict) -> list[tuple[str, str]]:
    counted = [] if verdict.spf is None else [("spf", verdict.spf)]
    return [*counted, ("dkim", verdict.dkim_summary), ("dmarc", verdict.dmarc.result)]
