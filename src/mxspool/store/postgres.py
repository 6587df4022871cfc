"""The multi-node store: PostgreSQL through psycopg 3 (async) and a connection pool.

Theory of operation
-------------------
Several mxspool nodes share one database; everything a node knows lives in it.

Intake (group commit). ``submit_message`` (the intake's, with a callback) and ``accept_message``
put the message on a queue. One writer task per store takes the first waiting accept and every
other one already queued, and stores them all with one prepared statement on its own
autocommit connection (kept, not borrowed from the pool per batch): one transaction and one
round trip for the whole batch, its parameters one JSON text and the bodies end to end. Its
commit (the store refuses to open with synchronous_commit off: the WAL is flushed, and with
synchronous replication acknowledged) is shared by the batch; callers are told only after it
returns, so an SMTP ``250`` never goes out before its message is durable. If the statement
fails, nothing of the batch is stored and the batch is replayed in one transaction, each accept
inside its own SAVEPOINT, so one bad accept fails alone; if that COMMIT fails, every accept of
the batch fails with StoreError and nothing of it is visible. A message whose body spilled to
disk is the exception: it is written on its own connection in its own transaction, 1 MiB at a
time, so a 150 MiB body never sits whole in memory nor holds up a batch of small messages.

Delivery. ``claim_due`` picks due recipients with ``SELECT ... FOR UPDATE SKIP LOCKED`` and
leases them (``lease_owner``, ``lease_until``) in the same statement, so two nodes never claim
the same row; it claims whole messages (all of a message's due rows in the domain, or none),
so a message goes to the next hop in one transaction. A row still ``delivering`` after its
lease ran out (its node died) is due again for anyone. ``record_outcomes`` only touches rows
still leased by the caller. The scheduler's indexes are partial (open states only), so
finished rows never slow a claim.

Wake-ups. Changes that make work appear NOTIFY the channel ``mxspool`` inside their own
transaction (delivered on commit): ``domains`` after any domain change, ``mail:<domain>`` after
accepts for a relay domain, a release, a canary or a retry. ``notifications()`` yields those
payloads; polling remains the fallback for anything lost while a listener reconnects.

Pacing. ``take_tokens`` (a token bucket row per destination) and ``acquire_slot`` /
``release_slot`` (expiring connection slots) make rate and concurrency limits hold for the
whole cluster rather than per node.

All timestamps are seconds since the epoch from the calling node's clock, as in the SQLite
store; nodes must keep their clocks in sync (NTP), since leases compare them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.errors
from psycopg import AsyncConnection, sql
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from mxspool.actor import audit_actor
from mxspool.addresses import address_key, ascii_lower
from mxspool.store import codec, counts, purge, queries
from mxspool.store.base import (
    FLUSH_ALL,
    HELD_UNTIL,
    SYNCHRONOUS_COMMIT_OFF,
    AcceptCallback,
    Conflict,
    CounterDrift,
    DeliveryJob,
    DestinationDeferral,
    Domain,
    DomainChanges,
    DomainMode,
    DomainStatus,
    DomainsTransition,
    IncomingMessage,
    Migration,
    MigrationChanges,
    NotFound,
    PurgeResult,
    RecipientCheck,
    RecipientHold,
    RecipientOutcome,
    StageEvent,
    StoreError,
    submit_via_task,
)
from mxspool.store.nodename import HOLDER_SQL, NAME_FREE_SQL, holder_text
from mxspool.store.schema import migration_scripts

log = logging.getLogger(__name__)

Conn = AsyncConnection[TupleRow]

BODY_CHUNK = 1 << 20
MAX_BATCH = 512
CHANNEL = "mxspool"
"""The LISTEN/NOTIFY channel; payloads are ``domains`` or ``mail:<domain>``."""
RESYNC = "resync"
"""Yielded by ``notifications()`` after each (re)connect: anything may have changed meanwhile."""

# Advisory lock keys. The two-int form (class, key) and the bigint form live in separate key
# spaces; the class tells our locks apart from anyone else's in the same database.
_SLOT_LOCK_CLASS = 0x6D78_7370  # "mxsp"
_MIGRATION_LOCK_SQL = (
    "SELECT pg_advisory_xact_lock(hashtextextended('mxspool-migrate:' || current_schema(), 0))"
)

FOLD_INTERVAL = 1.0
"""Seconds between folds of the recipient counter deltas into the counters."""
_FOLD_LOCK_SQL = "SELECT {lock}(hashtextextended('mxspool-fold:' || current_schema(), 0))"
_FOLD_SQL = (
    "WITH turn AS (" + _FOLD_LOCK_SQL.format(lock="pg_try_advisory_xact_lock") + " AS mine),"
    " moved AS (DELETE FROM recipient_count_deltas WHERE (SELECT mine FROM turn)"
    "  RETURNING domain, state, released, delta)"
    " INSERT INTO recipient_counts (domain, state, released, n)"
    " SELECT domain, state, released, sum(delta) FROM moved GROUP BY domain, state, released"
    " ON CONFLICT (domain, state, released) DO UPDATE SET n = recipient_counts.n + excluded.n"
)
"""One statement, one transaction: the deltas it deletes are the ones it adds."""
_COUNTERS_SQL = (
    "SELECT domain, state, released, sum(n) FROM ("
    " SELECT domain, state, released, n FROM recipient_counts"
    " UNION ALL SELECT domain, state, released, delta FROM recipient_count_deltas) c"
    " GROUP BY domain, state, released"
)
_OLDEST_SQL = (
    "SELECT d.name, (SELECT min(m.received_at) FROM (SELECT r.message_seq FROM recipients r"
    "  WHERE r.domain = d.name AND r.state IN ('pending', 'delivering')"
    "  ORDER BY r.id LIMIT %s) o JOIN messages m ON m.seq = o.message_seq)"
    " FROM unnest(%s::text[]) AS d(name)"
)
"""Each domain's oldest unfinished row: a probe of the recipients_open index."""
_RECENT_SQL = (
    "SELECT d.name, (SELECT count(*) FROM recipients r WHERE r.domain = d.name"
    "  AND r.state = 'delivered' AND r.delivered_at >= %s)"
    " FROM unnest(%s::text[]) AS d(name)"
)
"""Each domain's deliveries since a time: a range of the recipients_delivered index."""
_NOT_FOUND_MESSAGE = "no message {}; 'mxspool queue list' shows the queue"
_NO_DOMAIN = "no domain {}; 'mxspool domain list' shows the domains"


@dataclass(slots=True)
class _Accept:
    message: IncomingMessage
    on_done: AcceptCallback
    future: asyncio.Future[None] | None = None
    """``accept_message``'s (None from ``submit_message``); done early if its caller gave up."""

    def abandoned(self) -> bool:
        return self.future is not None and self.future.done()

    def finish(self, error: BaseException | None) -> None:
        try:
            self.on_done(error)
        except Exception:
            log.exception("an accept callback failed")


_STILL_RELAYING = (
    "(r.released OR EXISTS (SELECT 1 FROM domains d"
    " WHERE d.name = %(domain)s AND d.mode = 'relay'))"
)
"""A relay domain's row may go: a canary, or its domain still relays in this statement's
snapshot (one probe, evaluated once)."""


def claim_statement(relay: bool) -> str:
    """The one statement of a claim in a relay or a held domain (parameters ``domain``,
    ``now``, ``limit``, ``owner``, ``until``).

    Whole messages (one transaction each at the next hop): the first ``limit`` due rows no one
    else has locked choose the messages ("first", from the lanes of ``_claim_lanes``); every
    due row of those in this domain ("due", through recipients_message) is locked ("locked").
    A message is claimed only if all its due rows were locked here: when a concurrent claim
    holds some of them, both leave it, and the next claim takes it whole. SKIP LOCKED
    throughout: a claim never waits, so never deadlocks. The query's shape follows the mode
    so a held domain's claim reads only the canary index; in a relay domain the mode is
    checked again inside the statement (one snapshot), so a concurrent hold cannot make it
    claim held mail.
    """
    pending = _STILL_RELAYING if relay else "r.released"
    due = (
        "r.domain = %(domain)s AND r.state IN ('pending', 'delivering') AND ("
        f" (r.state = 'pending' AND r.next_attempt_at <= %(now)s AND NOT r.held"
        f" AND {pending})"
        " OR (r.state = 'delivering' AND r.lease_until < %(now)s))"
    )
    lanes = _claim_lanes(relay)
    return (
        "WITH "
        + "".join(
            f"{name} AS (SELECT r.id, r.message_seq FROM recipients r WHERE {where}"
            " LIMIT %(limit)s FOR UPDATE OF r SKIP LOCKED), "
            for name, where in lanes.items()
        )
        + "first AS (SELECT message_seq FROM ("
        + " UNION ALL ".join(f"SELECT * FROM {name}" for name in lanes)
        + ") l ORDER BY id LIMIT %(limit)s),"
        # The rows of the chosen messages, found by message_seq alone (OFFSET 0 keeps the due
        # condition out of the scan, so no plan can answer it from a domain-wide index), then
        # each locked by its id. Without statistics (autovacuum off) the planner otherwise
        # answered both with bitmaps over the domain's whole backlog: 1.6 s a claim at 200,000.
        " due AS MATERIALIZED (SELECT r.id, r.message_seq FROM ("
        " SELECT * FROM recipients r"
        " WHERE r.message_seq = ANY(ARRAY(SELECT DISTINCT message_seq FROM first)) OFFSET 0) r"
        f" WHERE {due}),"
        " locked AS MATERIALIZED (SELECT l.id, l.message_seq FROM due"
        " CROSS JOIN LATERAL (SELECT r.id, r.message_seq FROM recipients r"
        f" WHERE r.id = due.id AND {due} FOR UPDATE OF r SKIP LOCKED) l),"
        " whole AS (SELECT message_seq FROM (SELECT message_seq, 1 AS due, 0 AS locked FROM due"
        "  UNION ALL SELECT message_seq, 0, 1 FROM locked) x"
        "  GROUP BY message_seq HAVING sum(due) = sum(locked))"
        " UPDATE recipients r SET state = 'delivering', lease_owner = %(owner)s,"
        " lease_until = %(until)s, updated_at = %(now)s"
        " FROM locked, messages m WHERE r.id = locked.id"
        " AND locked.message_seq IN (SELECT message_seq FROM whole)"
        " AND m.seq = r.message_seq"
        f" RETURNING {queries.CLAIMED_COLUMNS}"
    )


def _claim_lanes(relay: bool) -> dict[str, str]:
    """The lanes of a claim, by name: each a WHERE ... ORDER BY over recipients ``r`` that
    ``claim_statement`` takes up to ``limit`` rows from, locked (SKIP LOCKED). Each reads an
    index range that holds only due candidates in the order wanted, so a claim costs the same
    with a million rows behind it (one walk of the domain's open rows in id order skipped every
    deferred or held row ahead of the first due one: 50 ms a claim with 100,000 deferred rows
    in front). ``fresh``: due since arrival, release or a retry-now (next_attempt_at 0), oldest
    first; ``retry``: retries whose time has come, earliest first; ``lapsed``: a dead worker's
    expired leases. ``claim_statement`` merges them by id, so an old retry is not starved by a
    stream of new mail. A held domain sends only its canaries (released rows,
    recipients_canary)."""
    lapsed = (
        "r.domain = %(domain)s AND r.state = 'delivering' AND r.lease_until < %(now)s"
        " ORDER BY r.lease_until"
    )
    if not relay:  # state IN (...): recipients_canary's own condition, so the index applies
        return {
            "canary": "r.domain = %(domain)s AND r.released"
            " AND r.state IN ('pending', 'delivering') AND r.state = 'pending'"
            " AND r.next_attempt_at <= %(now)s AND NOT r.held ORDER BY r.id",
            "lapsed": lapsed,
        }
    pending = f"r.domain = %(domain)s AND r.state = 'pending' AND NOT r.held AND {_STILL_RELAYING}"
    return {
        "fresh": f"{pending} AND r.next_attempt_at = 0 ORDER BY r.id",
        "retry": f"{pending} AND r.next_attempt_at > 0 AND r.next_attempt_at <= %(now)s"
        " ORDER BY r.next_attempt_at, r.id",
        "lapsed": lapsed,
    }


class PostgresStore(queries.ReadSide):
    """The Store protocol on PostgreSQL (see the module docstring); the reads it shares with
    SQLite come from ``queries.ReadSide``.

    ``url`` is a libpq URI (``postgresql://user@host:port/db?options=-csearch_path%3Dname``);
    every table lives in the first schema of the connection's search_path.
    """

    dialect = queries.POSTGRES

    def __init__(self, url: str, *, min_connections: int = 2, max_connections: int = 10) -> None:
        self.url = url
        self._min = min_connections
        self._max = max_connections
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._queue: asyncio.Queue[_Accept | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._folder: asyncio.Task[None] | None = None
        self._writer_conn: Conn | None = None
        """The writer's own connection, taken from the pool once (see ``_commit_batch``)."""

    # -- lifecycle ----------------------------------------------------------------------
    async def open(self) -> None:
        await self._migrate()
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            self.url,
            min_size=self._min,
            max_size=self._max,
            kwargs=_connect_kwargs(self.url),
            timeout=15.0,
            open=False,
            name="mxspool",
        )
        try:
            await pool.open(wait=True, timeout=15.0)
        except psycopg.Error as exc:
            await pool.close()
            raise StoreError(f"cannot connect to the PostgreSQL store: {exc}") from exc
        self._pool = pool
        self._queue = asyncio.Queue()
        self._writer = asyncio.create_task(self._write_loop(), name="postgres-writer")
        self._folder = asyncio.create_task(self._fold_loop(), name="postgres-counter-fold")

    async def _migrate(self) -> None:
        try:
            conn = await AsyncConnection.connect(self.url, **_connect_kwargs(self.url))
        except psycopg.Error as exc:
            raise StoreError(
                f"cannot connect to the PostgreSQL store: {exc}; check [store] url, that the "
                "server runs and that it accepts this user"
            ) from exc
        try:
            async with conn, conn.transaction():
                schema = await (
                    await conn.execute(
                        "SELECT current_schema(), current_setting('synchronous_commit')"
                    )
                ).fetchone()
                if schema is not None and schema[1] == "off":
                    raise StoreError(SYNCHRONOUS_COMMIT_OFF)
                if schema is None or schema[0] is None:
                    raise StoreError(
                        "the PostgreSQL store has no schema to create its tables in: the "
                        "connection's search_path names no existing schema; create it or fix "
                        "the options in [store] url"
                    )
                # Held until COMMIT: a node starting at the same time waits here, then sees
                # the migrations already applied.
                await conn.execute(_MIGRATION_LOCK_SQL)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version ("
                    " version integer PRIMARY KEY,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                row = await (
                    await conn.execute("SELECT coalesce(max(version), 0) FROM schema_version")
                ).fetchone()
                current = int(row[0]) if row else 0
                for version, script in migration_scripts("postgres"):
                    if version <= current:
                        continue
                    await conn.execute(script.encode())
                    await conn.execute(
                        "INSERT INTO schema_version (version) VALUES (%s)", (version,)
                    )
                    log.info("applied PostgreSQL store migration %d", version)
        except psycopg.Error as exc:
            raise StoreError(f"cannot migrate the PostgreSQL store: {exc}") from exc

    async def close(self) -> None:
        if self._folder is not None:
            self._folder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._folder
            self._folder = None
        if self._writer is not None:
            self._queue.put_nowait(None)
            try:
                await self._writer
            finally:
                self._writer = None
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is not None:
                job.finish(StoreError("the store is closing"))
        if self._pool is not None:
            await self._release_writer_conn()
            await self._pool.close()
            self._pool = None

    def free_bytes(self) -> int | None:
        """Not measurable from a client: watch the database server's disk instead."""
        return None

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Conn]:
        """A pooled connection (autocommit); driver errors become StoreError."""
        if self._pool is None:
            raise StoreError("the store is not open")
        try:
            async with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL store operation failed: {exc}") from exc

    async def _fetchall(self, query: Any, params: Any = None) -> list[TupleRow]:
        async with self._connection() as conn:
            cursor = await conn.execute(query, params)
            return await cursor.fetchall()

    async def _fetchone(self, query: Any, params: Any = None) -> TupleRow | None:
        async with self._connection() as conn:
            cursor = await conn.execute(query, params)
            return await cursor.fetchone()

    async def _fetch(self, query: str, params: Sequence[Any]) -> list[queries.Row]:
        return await self._fetchall(query, params)

    # -- intake -------------------------------------------------------------------------
    def submit_message(self, message: IncomingMessage, on_done: AcceptCallback) -> None:
        if self._writer is None:
            raise StoreError("the store is not open")
        if message.body.spilled:
            submit_via_task(self, message, on_done)
            return
        # The intake's hot path: straight onto the writer's queue, no task and no future.
        self._queue.put_nowait(_Accept(message, on_done))

    def deliver_ready(self) -> None:
        """Nothing: the writer task settles each accept through the loop's own queue."""

    async def accept_message(self, message: IncomingMessage) -> None:
        if self._writer is None:
            raise StoreError("the store is not open")
        if message.body.spilled:
            # Large: its own transaction and connection (see the module docstring).
            async with self._connection() as conn, conn.transaction():
                await _insert_message(conn, message)
                await _notify_relay_mail(conn, _domains_of(message))
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done(error: BaseException | None) -> None:
            if future.done():
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        self._queue.put_nowait(_Accept(message, done, future))
        await future

    async def _write_loop(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                return
            # One more turn of the loop before taking the rest: the sessions whose last DATA
            # bytes are already readable queue theirs too, and ride this commit rather than
            # wait a whole round trip for the next (fewer, larger batches: +8% on bench/accept).
            await asyncio.sleep(0)
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH and not self._queue.empty():
                more = self._queue.get_nowait()
                if more is None:
                    stop = True
                    break
                batch.append(more)
            # A caller that gave up (its SMTP client left) before we started needs no commit.
            batch = [job for job in batch if not job.abandoned()]
            if batch:
                try:
                    await self._commit_batch(batch)
                except Exception as exc:  # never let the writer die: callers would hang
                    error = StoreError(f"PostgreSQL commit failed: {exc}")
                    for job in batch:
                        job.finish(error)
            if stop:
                return

    async def _commit_batch(self, batch: list[_Accept]) -> None:
        messages = [job.message for job in batch]
        failures: dict[int, BaseException] = {}
        # The writer keeps one connection rather than borrowing one per batch (the pool's
        # checkout and return cost more of the event loop than dumping the batch); any
        # failure hands it back to the pool, which replaces it if it is broken.
        conn = await self._writer_connection()
        try:
            await _store_batch(conn, messages)
        except psycopg.OperationalError:
            await self._release_writer_conn()
            raise  # the connection or the server: the whole batch fails (_write_loop)
        except psycopg.Error:
            # A bad accept (or a failed commit): nothing of the batch is stored. Replay
            # them one SAVEPOINT each in one transaction, so a bad one fails alone.
            try:
                failures = await _insert_each(conn, messages)
            except BaseException:
                await self._release_writer_conn()
                raise
        except BaseException:
            await self._release_writer_conn()
            raise
        # Only now, the commit having returned, is every message durable.
        for index, job in enumerate(batch):
            failure = failures.get(index)
            if failure is not None and not isinstance(failure, StoreError):
                failure = StoreError(f"cannot store message {job.message.id}: {failure}")
            job.finish(failure)

    async def _writer_connection(self) -> Conn:
        conn = self._writer_conn
        if conn is not None and not conn.closed:
            return conn
        await self._release_writer_conn()
        if self._pool is None:
            raise StoreError("the store is not open")
        try:
            conn = await self._pool.getconn()
        except psycopg.Error as exc:  # PoolTimeout included
            raise StoreError(f"PostgreSQL store operation failed: {exc}") from exc
        self._writer_conn = conn
        return conn

    async def _release_writer_conn(self) -> None:
        conn, self._writer_conn = self._writer_conn, None
        if conn is not None and self._pool is not None:
            await self._pool.putconn(conn)

    # -- domains ------------------------------------------------------------------------
    async def add_domain(self, domain: Domain) -> None:
        now = time.time()
        try:
            async with self._connection() as conn, conn.transaction():
                await conn.execute(
                    f"INSERT INTO domains ({codec.DOMAIN_COLUMNS}, updated_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    codec.domain_row(domain, now),
                )
                await _domains_changed(conn, domain.name.lower(), domain.mode)
        except StoreError as exc:
            if isinstance(exc.__cause__, psycopg.errors.UniqueViolation):
                raise Conflict(
                    f"domain {domain.name} already exists; use 'mxspool domain route' to change it"
                ) from None
            raise

    async def update_domain(self, name: str, changes: DomainChanges) -> Domain:
        async with self._connection() as conn, conn.transaction():
            return await _update_domain_row(conn, name, changes)

    async def remove_domain(self, name: str, force: bool = False) -> None:
        name_l = name.lower()
        async with self._connection() as conn, conn.transaction():
            # Lock the row so no release or accept check races the count below.
            found = await (
                await conn.execute("SELECT 1 FROM domains WHERE name = %s FOR UPDATE", (name_l,))
            ).fetchone()
            if found is None:
                raise NotFound(_NO_DOMAIN.format(name))
            row = await (
                await conn.execute(
                    "SELECT count(*) FROM recipients WHERE domain = %s AND state IN "
                    "('pending', 'delivering', 'parked')",
                    (name_l,),
                )
            ).fetchone()
            open_count = int(row[0]) if row else 0
            if open_count and not force:
                raise Conflict(
                    f"domain {name} still has {open_count} recipients not delivered; release "
                    "and drain them first, or use --force (the mail stays in the store but "
                    "is no longer delivered)"
                )
            await conn.execute("DELETE FROM domains WHERE name = %s", (name_l,))
            await conn.execute("DELETE FROM migration_domains WHERE domain = %s", (name_l,))
            await _domains_changed(conn, None, None)

    async def release_recipient(self, domain: str, address: str) -> int:
        async with self._connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "UPDATE recipients SET released = true, next_attempt_at = 0, updated_at = %s "
                "WHERE domain = %s AND lower(rcpt) = lower(%s) AND state = 'pending'",
                (time.time(), domain.lower(), address),
            )
            if cursor.rowcount:
                await _notify(conn, f"mail:{domain.lower()}")
            return cursor.rowcount

    async def hold_recipient(self, hold: RecipientHold) -> int:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO recipient_holds (address, domain, prefix, suffix, created_at, actor)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (address) DO NOTHING",
                (hold.address, hold.domain, hold.prefix, hold.suffix, hold.created_at, hold.actor),
            )
            cursor = await conn.execute(
                "UPDATE recipients SET held = true, next_attempt_at = %(until)s,"
                " updated_at = %(now)s WHERE domain = %(domain)s AND state = 'pending'"
                " AND NOT held AND (lower(rcpt) = %(address)s OR (%(prefix)s <> ''"
                " AND left(lower(rcpt), length(%(prefix)s)) = %(prefix)s"
                " AND right(lower(rcpt), length(%(suffix)s)) = %(suffix)s))",
                {
                    "until": HELD_UNTIL,
                    "now": time.time(),
                    "domain": hold.domain,
                    "address": hold.address,
                    "prefix": hold.prefix,
                    "suffix": hold.suffix,
                },
            )
            return cursor.rowcount

    async def release_recipient_hold(self, address: str) -> int | None:
        async with self._connection() as conn, conn.transaction():
            row = await (
                await conn.execute(
                    "DELETE FROM recipient_holds WHERE address = %s"
                    " RETURNING domain, prefix, suffix",
                    (address.lower(),),
                )
            ).fetchone()
            if row is None:
                return None
            domain, prefix, suffix = row
            cursor = await conn.execute(
                "UPDATE recipients SET held = false, next_attempt_at = 0, updated_at = %(now)s"
                " WHERE domain = %(domain)s AND held AND (lower(rcpt) = %(address)s"
                " OR (%(prefix)s <> '' AND left(lower(rcpt), length(%(prefix)s)) = %(prefix)s"
                " AND right(lower(rcpt), length(%(suffix)s)) = %(suffix)s))",
                {
                    "now": time.time(),
                    "domain": domain,
                    "address": address.lower(),
                    "prefix": prefix,
                    "suffix": suffix,
                },
            )
            if cursor.rowcount:
                await _notify(conn, f"mail:{domain}")
            return cursor.rowcount

    async def flush_queue(self, now: float, domain: str | None = None) -> int:
        where = "r.domain = %(domain)s AND " if domain is not None else ""
        async with self._connection() as conn, conn.transaction():
            # Recorded (and notified, notifications keep their order) before the rows' own
            # notifications: an engine that wakes for the rows has already forgotten the
            # destination's dead state (delivery/scheduler.py).
            flushed = f"flush:{domain.lower() if domain is not None else FLUSH_ALL}"
            await conn.execute(
                "WITH g AS (INSERT INTO meta (key, value) VALUES ('flush_generation', 1)"
                " ON CONFLICT (key) DO UPDATE SET value = meta.value + 1 RETURNING value)"
                " INSERT INTO meta (key, value) SELECT %s, value FROM g"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (flushed,),
            )
            await _notify(conn, flushed)
            cursor = await conn.execute(
                "WITH changed AS (UPDATE recipients r SET next_attempt_at = %(now)s,"
                f" updated_at = %(now)s FROM domains d WHERE {where}d.name = r.domain"
                " AND r.state = 'pending' AND r.next_attempt_at > %(now)s AND NOT r.held"
                " AND (r.released OR d.mode = 'relay') RETURNING r.domain)"
                " SELECT domain, count(*) FROM changed GROUP BY domain",
                {"now": now, "domain": None if domain is None else domain.lower()},
            )
            total = 0
            for changed_domain, count in await cursor.fetchall():
                total += int(count)
                await _notify(conn, f"mail:{changed_domain}")
            return total

    async def record_recipient_checks(self, domain: str, checks: Sequence[RecipientCheck]) -> None:
        name = domain.lower()
        async with self._connection() as conn, conn.transaction():
            found = await conn.execute("SELECT 1 FROM domains WHERE name = %s FOR SHARE", (name,))
            if await found.fetchone() is None:
                raise NotFound(f"no domain {domain}; 'mxspool domain list' shows the domains")
            await conn.execute("DELETE FROM recipient_checks WHERE domain = %s", (name,))
            async with conn.cursor() as cursor:
                await cursor.executemany(
                    "INSERT INTO recipient_checks (domain, address, state, reply, checked_at)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (domain, address) DO UPDATE SET"
                    " state = excluded.state, reply = excluded.reply,"
                    " checked_at = excluded.checked_at",
                    [
                        (name, item.address.lower(), item.state, item.reply, item.checked_at)
                        for item in checks
                    ],
                )

    # -- queue --------------------------------------------------------------------------
    async def read_body(self, message_id: str) -> AsyncIterator[bytes]:
        row = await self._fetchone("SELECT seq FROM messages WHERE id = %s", (message_id,))
        if row is None:
            raise NotFound(_NOT_FOUND_MESSAGE.format(message_id))
        seq = int(row[0])
        chunk = 0
        while True:
            # One chunk per query: at most 1 MiB in memory, no connection held between pieces.
            piece = await self._fetchone(
                "SELECT data FROM bodies WHERE message_seq = %s AND chunk = %s", (seq, chunk)
            )
            if piece is None:
                if chunk == 0:  # no chunk at all: an empty body, or one purge dropped
                    tags = await self._fetchone("SELECT tags FROM messages WHERE seq = %s", (seq,))
                    if tags is not None and purge.purged_at(tags[0].split(",")):
                        raise purge.body_gone(message_id, tags[0])
                return
            chunk += 1
            data = bytes(piece[0])
            if data:
                yield data

    async def _set_final(self, message_id: str, state: str, reply: str | None) -> int:
        async with self._connection() as conn, conn.transaction():
            row = await (
                await conn.execute("SELECT seq FROM messages WHERE id = %s", (message_id,))
            ).fetchone()
            if row is None:
                raise NotFound(_NOT_FOUND_MESSAGE.format(message_id))
            cursor = await conn.execute(
                "UPDATE recipients SET state = %s, last_reply = coalesce(%s, last_reply), "
                "lease_owner = NULL, lease_until = NULL, updated_at = %s "
                "WHERE message_seq = %s AND state IN ('pending', 'delivering', 'parked')",
                (state, reply, time.time(), row[0]),
            )
            return cursor.rowcount

    async def discard(self, message_id: str) -> int:
        return await self._set_final(message_id, "discarded", None)

    async def mark_bounced(self, message_id: str, reply: str) -> int:
        return await self._set_final(message_id, "bounced", reply)

    async def retry(self, message_id: str | None = None, domain: str | None = None) -> int:
        async with self._connection() as conn, conn.transaction():
            where = ["state = 'parked'"]
            values: list[Any] = [time.time()]
            if message_id is not None:
                row = await (
                    await conn.execute("SELECT seq FROM messages WHERE id = %s", (message_id,))
                ).fetchone()
                if row is None:
                    raise NotFound(_NOT_FOUND_MESSAGE.format(message_id))
                where.append("message_seq = %s")
                values.append(row[0])
            if domain is not None:
                where.append("domain = %s")
                values.append(domain.lower())
            cursor = await conn.execute(
                "WITH changed AS (UPDATE recipients SET state = 'pending', next_attempt_at = 0, "
                f"updated_at = %s WHERE {' AND '.join(where)} RETURNING domain) "
                "SELECT domain, count(*) FROM changed GROUP BY domain",
                values,
            )
            total = 0
            for changed_domain, count in await cursor.fetchall():
                total += int(count)
                await _notify(conn, f"mail:{changed_domain}")
            return total

    async def status(self, now: float) -> list[DomainStatus]:
        async with self._connection() as conn, conn.transaction():
            # One snapshot: the folded counters plus the deltas not yet folded (migration
            # 0003), then one index probe per domain. O(domains), whatever the queue holds.
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            modes = {
                name: DomainMode(mode)
                for name, mode in await (
                    await conn.execute("SELECT name, mode FROM domains")
                ).fetchall()
            }
            rows: list[counts.CountRow] = [
                (domain, state, released, int(n))
                for domain, state, released, n in await (
                    await conn.execute(_COUNTERS_SQL + " HAVING sum(n) <> 0")
                ).fetchall()
            ]
            oldest: dict[str, float] = {}
            unfinished = counts.unfinished_domains(rows)
            if unfinished:
                cursor = await conn.execute(_OLDEST_SQL, (counts.OLDEST_WINDOW, unfinished))
                oldest = {name: first for name, first in await cursor.fetchall() if first}
            recent: dict[str, int] = {}
            delivered = counts.delivered_domains(rows)
            if delivered:
                cursor = await conn.execute(_RECENT_SQL, (now - 60.0, delivered))
                recent = {name: int(number) for name, number in await cursor.fetchall()}
        return counts.statuses(modes, rows, oldest, recent, now)

    async def check_counters(self, repair: bool = False) -> list[CounterDrift]:
        async with self._connection() as conn, conn.transaction():
            if repair:
                # No fold and no recipient write may run between the recount and the reset.
                await conn.execute(_FOLD_LOCK_SQL.format(lock="pg_advisory_xact_lock"))
                await conn.execute("LOCK TABLE recipients IN SHARE MODE")
            else:
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            stored = await (await conn.execute(_COUNTERS_SQL)).fetchall()
            actual = await (await conn.execute(counts.RECOUNT_SQL)).fetchall()
            found = counts.drift(stored, actual)
            if repair and found:
                await conn.execute("DELETE FROM recipient_count_deltas")
                await conn.execute("DELETE FROM recipient_counts")
                await conn.execute(
                    "INSERT INTO recipient_counts (domain, state, released, n) "
                    + counts.RECOUNT_SQL
                )
        return found

    async def purge_delivered(self, before: float, dry_run: bool = False) -> PurgeResult:
        found_sql = purge.candidates_sql("%s", "strpos")
        recheck = (
            "SELECT m.seq, m.size FROM messages m WHERE m.seq = ANY(%s)"
            f" AND {purge.condition('%s', 'strpos')} FOR UPDATE OF m"
        )
        tag = purge.tag_for(time.time())

        async def last_seq() -> int:
            row = await self._fetchone("SELECT coalesce(max(seq), 0) FROM messages")
            return int(row[0]) if row else 0

        async def find(after: int, upto: int) -> purge.Found:
            rows = await self._fetchall(found_sql, (after, upto, before, purge.BATCH))
            return [(int(seq), int(size)) for seq, size in rows]

        async def drop(seqs: list[int]) -> purge.Found:
            # The foreign keys bodies -> messages are gone (0004): the bodies are deleted here,
            # by message, and nothing else refers to them.
            async with self._connection() as conn, conn.transaction():
                found = await (await conn.execute(recheck, (seqs, before))).fetchall()
                chosen = [row[0] for row in found]
                await conn.execute("DELETE FROM bodies WHERE message_seq = ANY(%s)", (chosen,))
                await conn.execute(
                    "UPDATE messages SET tags = CASE WHEN tags = '' THEN %s"
                    " ELSE tags || ',' || %s END WHERE seq = ANY(%s)",
                    (tag, tag, chosen),
                )
            return [(int(seq), int(size)) for seq, size in found]

        return await purge.run(last_seq, find, drop, cutoff=before, dry_run=dry_run)

    async def fold_counters(self) -> None:
        """Fold the counter deltas into the counters (one node at a time; others skip)."""
        async with self._connection() as conn:
            await conn.execute(_FOLD_SQL)

    async def _fold_loop(self) -> None:
        while True:
            try:
                await self.fold_counters()
            except StoreError as exc:
                log.warning("folding the recipient counters failed (will retry): %s", exc)
            await asyncio.sleep(FOLD_INTERVAL)

    # -- audit --------------------------------------------------------------------------
    async def record_audit(self, actor: str, action: str, target: str, detail: str = "") -> None:
        actor = audit_actor(actor)  # "cli" becomes the OS user in a CLI process
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO audit (at, actor, action, target, detail) VALUES (%s, %s, %s, %s, %s)",
                (time.time(), actor, action, target, detail),
            )

    # -- migration toolkit ----------------------------------------------------------------
    async def add_recipients(
        self,
        domain: str,
        addresses: Sequence[str],
        replace: bool = False,
        max_sizes: Mapping[str, int] | None = None,
    ) -> int:
        name = ascii_lower(domain)
        sizes: dict[str, int | None] = {}
        for address in addresses:
            key = address_key(address)
            if key is not None:
                sizes[key] = (max_sizes or {}).get(address)
        keys = sorted(sizes)
        async with self._connection() as conn, conn.transaction():
            found = await (
                await conn.execute("SELECT 1 FROM domains WHERE name = %s FOR UPDATE", (name,))
            ).fetchone()
            if found is None:
                raise NotFound(_NO_DOMAIN.format(domain))
            if replace:
                await conn.execute("DELETE FROM recipient_lists WHERE domain = %s", (name,))
            await conn.execute(
                "INSERT INTO recipient_lists (domain, address, max_size) "
                "SELECT %s, a, s FROM unnest(%s::text[], %s::bigint[]) AS x(a, s) "
                "ON CONFLICT (domain, address) DO UPDATE SET max_size = excluded.max_size",
                (name, keys, [sizes[key] for key in keys]),
            )
            await _domains_changed(conn, None, None)
            row = await (
                await conn.execute(
                    "SELECT count(*) FROM recipient_lists WHERE domain = %s", (name,)
                )
            ).fetchone()
            return int(row[0]) if row else 0

    async def clear_recipients(self, domain: str) -> int:
        async with self._connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "DELETE FROM recipient_lists WHERE domain = %s", (domain.lower(),)
            )
            await _domains_changed(conn, None, None)
            return cursor.rowcount

    async def add_tag(self, message_id: str, tag: str) -> None:
        async with self._connection() as conn, conn.transaction():
            row = await (
                await conn.execute(
                    "SELECT tags FROM messages WHERE id = %s FOR UPDATE", (message_id,)
                )
            ).fetchone()
            if row is None:
                raise NotFound(_NOT_FOUND_MESSAGE.format(message_id))
            tags = [item for item in row[0].split(",") if item]
            if tag not in tags:
                tags.append(tag)
                await conn.execute(
                    "UPDATE messages SET tags = %s WHERE id = %s", (",".join(tags), message_id)
                )

    async def set_authentication(
        self, message_id: str, auth_results: str, tags: Sequence[str]
    ) -> None:
        if await self.set_authentications([(message_id, auth_results, tags)]):
            raise NotFound(_NOT_FOUND_MESSAGE.format(message_id))

    async def set_authentications(
        self, verdicts: Sequence[tuple[str, str, Sequence[str]]]
    ) -> list[str]:
        items = {mid: (value, list(tags)) for mid, value, tags in verdicts}
        if not items:
            return []
        now = time.time()
        async with self._connection() as conn, conn.transaction():
            rows = await (
                await conn.execute(
                    "SELECT id, tags FROM messages WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
                    (list(items),),
                )
            ).fetchall()
            found = {row[0]: row[1] for row in rows}
            updates = [
                (value, now, codec.merge_tags(found[mid], tags), mid)
                for mid, (value, tags) in items.items()
                if mid in found
            ]
            async with conn.cursor() as cursor:
                await cursor.executemany(
                    "UPDATE messages SET auth_results = %s, auth_at = %s, tags = %s WHERE id = %s",
                    updates,
                )
        return [mid for mid in items if mid not in found]

    async def mark_unjudged(
        self, node: str, message_ids: Sequence[str] = (), *, move: bool = False
    ) -> None:
        sql, params = queries.unjudged_sql(self.dialect, node, message_ids, move=move)
        async with self._connection() as conn:
            await conn.execute(sql, params)

    async def clear_unjudged(self, node: str) -> None:
        sql, params = queries.clear_unjudged_sql(self.dialect, node)
        async with self._connection() as conn:
            await conn.execute(sql, params)

    async def adopt_unjudged(self, node: str) -> list[str]:
        sql, params = queries.other_marks_sql(self.dialect, node)
        adopted = []
        for (other,) in await self._fetchall(sql, params):
            async with self._connection() as conn, conn.transaction():
                # A running node holds its name (store.nodename); while this transaction
                # holds it instead, that node cannot start (it waits for the name).
                free = await (await conn.execute(NAME_FREE_SQL, (other,))).fetchone()
                if free is None or not free[0]:
                    continue
                for statement, values in queries.adopt_mark_sql(self.dialect, node, other):
                    await conn.execute(statement, values)
            adopted.append(str(other))
        return adopted

    # -- delivery -----------------------------------------------------------------------
    async def due_domains(self, now: float) -> list[str]:
        # Per domain, three probes of one partial index each, stopping at the first row
        # found. LATERAL keeps the planner from hashing every open row instead (which would
        # walk a held domain's whole backlog on each poll).
        rows = await self._fetchall(
            "SELECT d.name FROM domains d CROSS JOIN LATERAL ("
            " (SELECT 1 FROM recipients r WHERE d.mode = 'relay' AND r.domain = d.name"
            "   AND r.state = 'pending' AND r.next_attempt_at <= %(now)s"
            "   ORDER BY r.next_attempt_at LIMIT 1)"
            " UNION ALL"
            " (SELECT 1 FROM recipients r WHERE r.domain = d.name AND r.released"
            "   AND r.state IN ('pending', 'delivering') AND r.state = 'pending'"
            "   AND r.next_attempt_at <= %(now)s LIMIT 1)"
            " UNION ALL"
            " (SELECT 1 FROM recipients r WHERE r.domain = d.name"
            "   AND r.state = 'delivering' AND r.lease_until < %(now)s"
            "   ORDER BY r.lease_until LIMIT 1)"
            " LIMIT 1) AS due ORDER BY d.name",
            {"now": now},
        )
        return [row[0] for row in rows]

    async def next_due_at(self, domain: str) -> float | None:
        # The earliest of three index probes (least() skips NULLs); a held domain's backlog
        # is not even looked at.
        row = await self._fetchone(
            "SELECT least("
            " (SELECT min(r.next_attempt_at) FROM recipients r WHERE d.mode = 'relay'"
            "   AND r.domain = d.name AND r.state = 'pending'),"
            " (SELECT min(r.next_attempt_at) FROM recipients r WHERE r.domain = d.name"
            "   AND r.released AND r.state IN ('pending', 'delivering') AND r.state = 'pending'),"
            " (SELECT min(r.lease_until) FROM recipients r WHERE r.domain = d.name"
            "   AND r.state = 'delivering'))"
            " FROM domains d WHERE d.name = %s",
            (domain.lower(),),
        )
        return None if row is None or row[0] is None else float(row[0])

    async def defer_destination(self, domain: str, deferral: DestinationDeferral) -> int:
        # One statement. A row another node claims meanwhile is locked by that claim: this
        # update waits, re-checks it (no longer pending, lease live) and leaves it alone; a
        # row this update took first is skipped by the claim (SKIP LOCKED).
        async with self._connection() as conn:
            cursor = await conn.execute(
                "UPDATE recipients r SET"
                " state = CASE WHEN m.received_at <= %(cutoff)s THEN 'parked' ELSE 'pending' END,"
                " last_reply = CASE WHEN m.received_at <= %(cutoff)s THEN %(expired)s"
                "  ELSE %(reply)s END,"
                " next_attempt_at = %(until)s, lease_owner = NULL, lease_until = NULL,"
                " updated_at = %(now)s"
                " FROM messages m, domains d"
                " WHERE r.domain = %(domain)s AND d.name = %(domain)s AND m.seq = r.message_seq"
                " AND r.state IN ('pending', 'delivering') AND (d.mode = 'relay' OR r.released)"
                " AND NOT r.held"
                " AND ((r.state = 'pending'"
                "   AND (r.next_attempt_at <> %(until)s OR m.received_at <= %(cutoff)s))"
                "  OR (r.state = 'delivering' AND r.lease_until < %(now)s))",
                codec.deferral_params(domain, deferral),
            )
            return cursor.rowcount

    async def claim_due(
        self, owner: str, now: float, lease_seconds: float, limit: int, domain: str
    ) -> list[DeliveryJob]:
        name = domain.lower()
        async with self._connection() as conn:
            mode_row = await (
                await conn.execute("SELECT mode FROM domains WHERE name = %s", (name,))
            ).fetchone()
            if mode_row is None:
                return []
            if mode_row[0] != "relay":
                # A dead worker's claims in a domain put back on hold are held again, not sent.
                await conn.execute(
                    "UPDATE recipients SET state = 'pending', lease_owner = NULL, "
                    "lease_until = NULL, updated_at = %s WHERE domain = %s AND state = "
                    "'delivering' AND lease_until < %s AND NOT released",
                    (now, name, now),
                )
            cursor = await conn.execute(
                claim_statement(mode_row[0] == "relay"),
                {
                    "domain": name,
                    "now": now,
                    "limit": limit,
                    "owner": owner,
                    "until": now + lease_seconds,
                },
            )
            rows = await cursor.fetchall()
        return queries.delivery_jobs(rows, name)

    async def release_claims(self, owner: str, recipient_ids: Sequence[int]) -> None:
        ids = list(recipient_ids)
        if not ids:
            return
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE recipients SET state = 'pending', next_attempt_at = 0, "
                "lease_owner = NULL, lease_until = NULL WHERE lease_owner = %s "
                "AND state = 'delivering' AND id = ANY(%s::bigint[])",
                (owner, ids),
            )

    async def renew_leases(self, owner: str, recipient_ids: Sequence[int], until: float) -> None:
        ids = list(recipient_ids)
        if not ids:
            return
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE recipients SET lease_until = %s WHERE lease_owner = %s "
                "AND state = 'delivering' AND id = ANY(%s::bigint[])",
                (until, owner, ids),
            )

    async def record_outcomes(self, owner: str, outcomes: Sequence[RecipientOutcome]) -> None:
        items = list(outcomes)
        if not items:
            return
        now = time.time()
        # One statement: the updates and the attempt log commit together, and only rows still
        # leased by ``owner`` change (a row whose lease expired and moved on is left alone).
        async with self._connection() as conn:
            await conn.execute(
                "WITH o AS (SELECT * FROM unnest(%(ids)s::bigint[], %(states)s::text[],"
                " %(replies)s::text[], %(counts)s::boolean[], %(nexts)s::float8[],"
                " %(dests)s::text[], %(sents)s::text[])"
                " AS o(id, state, reply, counted, next_at, destination, sent)),"
                " changed AS (UPDATE recipients r SET state = o.state, last_reply = o.reply,"
                "  attempts = r.attempts + CASE WHEN o.counted THEN 1 ELSE 0 END,"
                "  next_attempt_at = o.next_at,"
                "  delivered_at = CASE WHEN o.state = 'delivered' THEN %(now)s END,"
                "  sent_sha256 = o.sent,"
                "  lease_owner = NULL, lease_until = NULL, updated_at = %(now)s"
                "  FROM o WHERE r.id = o.id AND r.state = 'delivering'"
                "  AND r.lease_owner = %(owner)s RETURNING r.id)"
                " INSERT INTO attempts (recipient_id, at, destination, outcome, reply)"
                " SELECT o.id, %(now)s, o.destination, o.state, o.reply"
                " FROM o JOIN changed c ON c.id = o.id WHERE o.counted",
                {
                    "ids": [item.recipient_id for item in items],
                    "states": [item.state.value for item in items],
                    "replies": [item.reply for item in items],
                    "counts": [item.count_attempt for item in items],
                    "nexts": [float(item.next_attempt_at) for item in items],
                    "dests": [item.destination for item in items],
                    "sents": [item.sent_sha256 for item in items],
                    "now": now,
                    "owner": owner,
                },
            )

    # -- wake-ups -----------------------------------------------------------------------
    async def notifications(self) -> AsyncIterator[str]:
        """Payloads NOTIFYed on the ``mxspool`` channel, by this node or any other.

        ``domains``: some domain changed (reload, compare domains_generation).
        ``mail:<domain>``: new due mail for the domain (accepts in relay mode, a release,
        a canary, a retry). ``flush:<domain>`` (``flush:*``: all): ``queue flush``, sent
        before that flush's ``mail:`` notifications. ``resync``: the listener (re)connected
        and may have missed notifications: re-check everything. Reconnects on its own with
        backoff; runs until the consumer stops iterating. Polling stays the safety net: a
        notification is a hint.
        """
        delay = 0.5
        while True:
            try:
                conn = await AsyncConnection.connect(
                    self.url, **_connect_kwargs(self.url, listener=True)
                )
            except psycopg.Error as exc:
                log.warning("cannot LISTEN on the PostgreSQL store (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            try:
                async with conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                    delay = 0.5
                    yield RESYNC
                    async for note in conn.notifies():
                        yield note.payload
            except psycopg.Error as exc:
                log.warning("lost the PostgreSQL notification listener (%s); reconnecting", exc)
                await asyncio.sleep(delay)

    async def notify(self, payload: str) -> None:
        """Send one payload to every listener (for callers outside a store transaction)."""
        async with self._connection() as conn:
            await _notify(conn, payload)

    # -- cluster-wide pacing --------------------------------------------------------------
    async def take_tokens(
        self, bucket: str, rate: float, burst: float, want: int, now: float
    ) -> int:
        """Take up to ``want`` tokens from the bucket shared by every node; how many were got.

        The bucket refills at ``rate`` tokens per second up to ``burst`` and starts full. One
        upsert does the refill, the take and the answer under the row lock, so concurrent
        callers on several nodes never take more than the bucket held. A clock a little behind
        another node's never refills twice (the bucket's time only moves forward).
        """
        if want <= 0:
            return 0
        row = await self._fetchone(
            "INSERT INTO rate_buckets AS b (bucket, tokens, updated_at, last_grant)"
            " VALUES (%(bucket)s, %(burst)s - floor(least(%(burst)s, %(want)s)), %(now)s,"
            "  floor(least(%(burst)s, %(want)s)))"
            " ON CONFLICT (bucket) DO UPDATE SET"
            "  last_grant = floor(greatest(0, least(%(want)s, least(%(burst)s, b.tokens"
            "   + %(rate)s * greatest(0, %(now)s - b.updated_at))))),"
            "  tokens = least(%(burst)s, b.tokens + %(rate)s * greatest(0, %(now)s"
            "   - b.updated_at)) - floor(greatest(0, least(%(want)s, least(%(burst)s,"
            "   b.tokens + %(rate)s * greatest(0, %(now)s - b.updated_at))))),"
            "  updated_at = greatest(b.updated_at, %(now)s)"
            " RETURNING last_grant",
            {
                "bucket": bucket,
                "rate": float(rate),
                "burst": float(max(burst, 1.0)),
                "want": float(want),
                "now": now,
            },
        )
        return int(row[0]) if row else 0

    async def acquire_slot(self, destination: str, owner: str, limit: int, ttl: float) -> bool:
        """Take (or renew) one of ``limit`` concurrent slots for ``destination``, cluster-wide.

        ``owner`` names the holder (node id plus connection number); acquiring a slot the owner
        already holds renews it. A slot not renewed or released within ``ttl`` seconds expires
        (its node died), so the limit heals on its own. False when all slots are taken.
        """
        now = time.time()
        async with self._connection() as conn, conn.transaction():
            # Count-then-insert is only safe when callers for one destination take turns.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_SLOT_LOCK_CLASS, destination)
            )
            await conn.execute(
                "DELETE FROM delivery_slots WHERE destination = %s AND expires_at < %s",
                (destination, now),
            )
            row = await (
                await conn.execute(
                    "INSERT INTO delivery_slots (destination, owner, expires_at)"
                    " SELECT %(d)s, %(o)s, %(exp)s WHERE (SELECT count(*) FROM delivery_slots"
                    "  WHERE destination = %(d)s AND owner <> %(o)s) < %(limit)s"
                    " ON CONFLICT (destination, owner) DO UPDATE SET expires_at = %(exp)s"
                    " RETURNING 1",
                    {"d": destination, "o": owner, "exp": now + ttl, "limit": limit},
                )
            ).fetchone()
            return row is not None

    async def release_slot(self, destination: str, owner: str) -> None:
        """Give a slot back (no error when it already expired)."""
        async with self._connection() as conn:
            await conn.execute(
                "DELETE FROM delivery_slots WHERE destination = %s AND owner = %s",
                (destination, owner),
            )

    # -- migrations (issue 12) ----------------------------------------------------------
    async def add_migration(self, migration: Migration) -> None:
        now = time.time()
        try:
            async with self._connection() as conn, conn.transaction():
                await conn.execute(*queries.migration_insert(self.dialect, migration, now))
                await _add_members(conn, migration.name, migration.domains, now)
                await _domains_changed(conn, None, None)
        except StoreError as exc:
            if isinstance(exc.__cause__, psycopg.errors.UniqueViolation):
                raise Conflict(queries.migration_exists(migration.name)) from None
            raise

    async def change_migration_domains(
        self, name: str, add: Sequence[str] = (), remove: Sequence[str] = ()
    ) -> Migration:
        async with self._connection() as conn, conn.transaction():
            found = await (
                await conn.execute("SELECT 1 FROM migrations WHERE name = %s FOR UPDATE", (name,))
            ).fetchone()
            if found is None:
                raise NotFound(queries.no_migration(name))
            for domain in remove:
                cursor = await conn.execute(
                    "DELETE FROM migration_domains WHERE migration = %s AND domain = %s",
                    (name, domain.lower()),
                )
                if cursor.rowcount == 0:
                    raise NotFound(queries.not_in_migration(domain, name))
            await _add_members(conn, name, add, time.time())
            await _domains_changed(conn, None, None)
        return await self._require_migration(name)

    async def update_migration(self, name: str, changes: MigrationChanges) -> Migration:
        async with self._connection() as conn, conn.transaction():
            await _update_migration_row(conn, name, changes)
        return await self._require_migration(name)

    async def remove_migration(self, name: str) -> None:
        async with self._connection() as conn, conn.transaction():
            await conn.execute("DELETE FROM migration_domains WHERE migration = %s", (name,))
            cursor = await conn.execute("DELETE FROM migrations WHERE name = %s", (name,))
            if cursor.rowcount == 0:
                raise NotFound(queries.no_migration(name))
            await _domains_changed(conn, None, None)

    async def apply_transition(self, transition: DomainsTransition) -> list[Domain]:
        audit = transition.audit
        events = queries.event_rows(transition.events)
        name = transition.migration
        async with self._connection() as conn, conn.transaction():
            if transition.expect_release_at is not None:
                row = await (
                    await conn.execute(
                        "SELECT release_at FROM migrations WHERE name = %s FOR UPDATE", (name,)
                    )
                ).fetchone()
                if row is None or row[0] != transition.expect_release_at:
                    raise Conflict(f"the scheduled release of {name} was changed or done")
            updated = [
                await _update_domain_row(conn, domain, changes)
                for domain, changes in transition.changes.items()
            ]
            if name is not None and transition.migration_changes is not None:
                await _update_migration_row(conn, name, transition.migration_changes)
            await _insert_events(conn, events)
            if audit is not None:
                await conn.execute(
                    "INSERT INTO audit (at, actor, action, target, detail) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    (audit.at, audit_actor(audit.actor), audit.action, audit.target, audit.detail),
                )
        return updated

    async def record_stage_events(self, events: Sequence[StageEvent]) -> None:
        rows = queries.event_rows(events)
        if rows:
            async with self._connection() as conn, conn.transaction():
                await _insert_events(conn, rows)


def _connect_kwargs(url: str, listener: bool = False) -> dict[str, Any]:
    # Keepalives notice a dead server or a silent network partition, which matters most for
    # the listener: it would otherwise wait forever for notifications that never come.
    kwargs: dict[str, Any] = {
        "autocommit": True,
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
    }
    # Keyword arguments override the URL's own parameters: only fill in what it leaves out.
    if "application_name=" not in url:
        kwargs["application_name"] = "mxspool-listen" if listener else "mxspool"
    if "connect_timeout=" not in url:
        kwargs["connect_timeout"] = 10
    return kwargs


def _domains_of(message: IncomingMessage) -> set[str]:
    return {row[1] for row in codec.accept_recipients(message)}


async def _update_domain_row(conn: Conn, name: str, changes: DomainChanges) -> Domain:
    """Change one domain within the caller's transaction; NotFound when absent."""
    sets: list[sql.Composable] = []
    values: list[Any] = []

    def put(column: str, value: Any) -> None:
        sets.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
        values.append(value)

    if changes.mode is not None:
        put("mode", changes.mode.value)
    if changes.routes is not None:
        put("routes", codec.dump_routes(changes.routes))
    if changes.use_mx is not None:
        put("use_mx", changes.use_mx)
    if changes.tls is not None:
        put("tls", changes.tls.value)
    if changes.rate is not None or changes.clear_rate:
        put("rate", changes.rate)
    if changes.profile is not None:
        put("profile", changes.profile or None)
    if changes.released_at is not None:
        put("released_at", changes.released_at)
    if changes.max_size is not None or changes.clear_max_size:
        put("max_size", changes.max_size)
    if changes.subdomains is not None:
        put("subdomains", changes.subdomains)
    if changes.plus_separator is not None:
        put("plus_separator", changes.plus_separator)
    put("updated_at", time.time())
    query = sql.SQL("UPDATE domains SET {} WHERE name = %s RETURNING {}").format(
        sql.SQL(", ").join(sets), sql.SQL(codec.DOMAIN_COLUMNS)
    )
    row = await (await conn.execute(query, (*values, name.lower()))).fetchone()
    if row is None:
        raise NotFound(_NO_DOMAIN.format(name))
    domain = codec.domain_from_row(row)
    await _domains_changed(conn, domain.name, domain.mode)
    return domain


async def _add_members(conn: Conn, migration: str, domains: Sequence[str], now: float) -> None:
    for domain in domains:
        name = domain.lower()
        known = await (
            await conn.execute("SELECT 1 FROM domains WHERE name = %s", (name,))
        ).fetchone()
        if known is None:
            raise NotFound(f"no domain {domain}; add it first with 'mxspool domain add {domain}'")
        other = await (
            await conn.execute("SELECT migration FROM migration_domains WHERE domain = %s", (name,))
        ).fetchone()
        if other is not None:
            if other[0] == migration:
                continue
            raise Conflict(queries.taken(name, other[0]))
        await conn.execute(
            "INSERT INTO migration_domains (migration, domain, added_at) VALUES (%s, %s, %s)",
            (migration, name, now),
        )


async def _update_migration_row(conn: Conn, name: str, changes: MigrationChanges) -> None:
    sets = [*queries.migration_sets(changes), ("updated_at", time.time())]
    query = sql.SQL("UPDATE migrations SET {} WHERE name = %s").format(
        sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(column)) for column, _ in sets)
    )
    cursor = await conn.execute(query, (*(value for _, value in sets), name))
    if cursor.rowcount == 0:
        raise NotFound(queries.no_migration(name))
    await _domains_changed(conn, None, None)


async def _insert_events(conn: Conn, rows: list[tuple[Any, ...]]) -> None:
    if rows:
        async with conn.cursor() as cursor:
            await cursor.executemany(
                "INSERT INTO stage_events (domain, stage, at, actor, detail, migration) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                rows,
            )


async def _notify(conn: Conn, payload: str) -> None:
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


async def _notify_relay_mail(conn: Conn, domains: set[str]) -> None:
    if domains:
        await conn.execute(
            "SELECT pg_notify(%s, 'mail:' || name) FROM domains "
            "WHERE mode = 'relay' AND name = ANY(%s::text[])",
            (CHANNEL, sorted(domains)),
        )


async def _domains_changed(conn: Conn, name: str | None, mode: DomainMode | None) -> None:
    await conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'domains_generation'")
    await _notify(conn, "domains")
    if name is not None and mode is DomainMode.RELAY:
        await _notify(conn, f"mail:{name}")


async def _insert_each(conn: Conn, messages: list[IncomingMessage]) -> dict[int, BaseException]:
    """One transaction, each message in its own SAVEPOINT; returns the ones that failed."""
    failures: dict[int, BaseException] = {}
    domains: set[str] = set()
    async with conn.transaction():
        for index, message in enumerate(messages):
            try:
                async with conn.transaction():
                    await _insert_message(conn, message)
            except psycopg.OperationalError:
                raise
            except Exception as exc:
                failures[index] = exc
            else:
                domains |= _domains_of(message)
        await _notify_relay_mail(conn, domains)
    return failures


async def _store_batch(conn: Conn, messages: list[IncomingMessage]) -> None:
    """Store a batch of in-memory messages: one statement, one transaction, one round trip.

    The connection is in autocommit, so the statement is a transaction of its own: PostgreSQL
    commits it before it answers (with synchronous_commit on: once the WAL is flushed), and any
    failure, the commit's included, raises here with nothing of the batch stored. Prepared on
    first use, a batch then sends its parameters only: Bind, Execute and Sync in one write.
    """
    if not conn.autocommit or conn.info.transaction_status != TransactionStatus.IDLE:
        # Inside a transaction the statement would not commit, and a 250 would not be durable.
        raise StoreError("the accept batch needs an idle autocommit connection; this is a bug")
    await conn.execute(_INSERT_BATCH, _batch_params(messages), prepare=True)


# The batch travels as two parameters: one JSON text (an array per message: the messages
# columns in codec.MESSAGE_COLUMNS order, its recipients as [address, domain, params], and
# where its body starts and how long it is) and every body end to end in one binary bytea.
# Both are dumped by one C call each, where twenty arrays cost psycopg about 0.1 ms of the
# event loop per batch. The NOTIFY for the relay domains runs exactly once per row
# (MATERIALIZED). Bytes, so that psycopg need not encode the statement per execution.
_INSERT_BATCH = (
    b"WITH x AS MATERIALIZED (SELECT j, n FROM jsonb_array_elements(%(batch)s::jsonb)"
    b"  WITH ORDINALITY AS t(j, n)),"
    b" m AS (INSERT INTO messages (id, received_at, mail_from, mail_params, size,"
    b" sha256, message_id, client_address, client_name, helo, tls_version, tls_cipher, tags)"
    b" SELECT j->>0, (j->>1)::float8, j->>2, j->>3, (j->>4)::bigint, j->>5, j->>6, j->>7,"
    b"  j->>8, j->>9, j->>10, j->>11, j->>12"
    b" FROM x ORDER BY n RETURNING seq, id, received_at),"
    b" r AS (INSERT INTO recipients (message_seq, rcpt, domain, params, state, last_reply,"
    b" updated_at) SELECT m.seq, y.rc->>0, y.rc->>1, y.rc->>2, coalesce(y.rc->>3, 'pending'),"
    b" y.rc->>4, m.received_at"
    b" FROM x JOIN m ON m.id = x.j->>0,"
    b"  jsonb_array_elements(x.j->13) WITH ORDINALITY AS y(rc, k) ORDER BY x.n, y.k),"
    b" b AS (INSERT INTO bodies (message_seq, chunk, data)"
    b" SELECT m.seq, 0, substring(%(bodies)b::bytea FROM (x.j->>14)::int + 1"
    b"  FOR (x.j->>15)::int) FROM x JOIN m ON m.id = x.j->>0),"
    b" n AS MATERIALIZED (SELECT pg_notify(%(channel)s, 'mail:' || name) FROM domains"
    b"  WHERE mode = 'relay' AND name IN (SELECT json_array_elements_text(%(domains)s::json)))"
    b" SELECT (SELECT count(*) FROM m), (SELECT count(*) FROM n)"
)
_BATCH_JSON = json.JSONEncoder(separators=(",", ":"))


def _batch_params(messages: list[IncomingMessage]) -> dict[str, Any]:
    rows: list[list[Any]] = []
    bodies: list[bytes] = []
    domains: set[str] = set()
    start = 0
    for message in messages:
        data = message.body.getvalue()
        if data is None:
            raise StoreError(f"message {message.id} spilled to disk; it is stored on its own")
        row: list[Any] = list(codec.message_row(message).values())
        recipients = codec.accept_recipients(message)
        row += (recipients, start, len(data))
        rows.append(row)
        bodies.append(data)
        start += len(data)
        domains.update(recipient[1] for recipient in recipients)
    return {
        "batch": _BATCH_JSON.encode(rows),
        "bodies": b"".join(bodies),
        "channel": CHANNEL,
        "domains": _BATCH_JSON.encode(sorted(domains)),
    }


async def _insert_message(conn: Conn, message: IncomingMessage) -> None:
    """Insert the message, its recipients and its bytes (the caller owns the transaction)."""
    body = message.body
    in_memory = body.getvalue()
    rows = codec.accept_recipients(message)
    cursor = await conn.execute(
        "WITH m AS (INSERT INTO messages (id, received_at, mail_from, mail_params, size, sha256,"
        " message_id, client_address, client_name, helo, tls_version, tls_cipher, tags)"
        " VALUES (%(id)s, %(received_at)s, %(mail_from)s, %(mail_params)s, %(size)s,"
        " %(sha256)s, %(message_id)s, %(client_address)s, %(client_name)s, %(helo)s,"
        " %(tls_version)s, %(tls_cipher)s, %(tags)s) RETURNING seq),"
        " r AS (INSERT INTO recipients (message_seq, rcpt, domain, params, state, last_reply,"
        " updated_at) SELECT m.seq, x.rcpt, x.domain, x.params, x.state, x.reply,"
        " %(received_at)s FROM m, unnest(%(rcpts)s::text[], %(domains)s::text[],"
        " %(params)s::text[], %(states)s::text[], %(replies)s::text[])"
        " WITH ORDINALITY AS x(rcpt, domain, params, state, reply, n) ORDER BY x.n),"
        " b AS (INSERT INTO bodies (message_seq, chunk, data)"
        " SELECT m.seq, 0, %(data)b::bytea FROM m WHERE %(data)b::bytea IS NOT NULL)"
        " SELECT seq FROM m",
        {
            **codec.message_row(message),
            "rcpts": [row[0] for row in rows],
            "domains": [row[1] for row in rows],
            "params": [row[2] for row in rows],
            "states": [row[3] if len(row) > 3 else "pending" for row in rows],
            "replies": [row[4] if len(row) > 4 else None for row in rows],
            "data": in_memory,
        },
    )
    if in_memory is not None:
        return
    row = await cursor.fetchone()
    if row is None:
        raise StoreError(f"cannot store message {message.id}: no row inserted")
    seq = int(row[0])
    # Spilled: copy the file 1 MiB at a time; the file reads run off the event loop.
    pieces = body.chunks(BODY_CHUNK)
    chunk = 0
    while True:
        piece = await asyncio.to_thread(next, pieces, None)
        if piece is None:
            break
        await conn.execute(
            "INSERT INTO bodies (message_seq, chunk, data) VALUES (%s, %s, %b)",
            (seq, chunk, piece),
        )
        chunk += 1


# -- what doctor asks of the server --------------------------------------------------------

HEALTH_SETTINGS = (
    "server_version",
    "synchronous_commit",
    "fsync",
    "full_page_writes",
    "autovacuum",
    "track_counts",
)
"""Server settings ``mxspool doctor`` reads (as the connection sees them: role, database and
URL options included)."""

_HEALTH_SQL = "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)"
# Tables of the store's schema whose autovacuum was turned off (ALTER TABLE ... SET
# (autovacuum_enabled = off)); PostgreSQL accepts any prefix of false/off/no, or 0.
_NO_AUTOVACUUM_SQL = (
    "SELECT c.relname FROM pg_class c WHERE c.relkind = 'r'"
    " AND c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())"
    " AND EXISTS (SELECT 1 FROM unnest(c.reloptions) AS o"
    "  WHERE o ~* '^autovacuum_enabled=(f|fa|fal|fals|false|n|no|of|off|0)$')"
    " ORDER BY c.relname"
)


@dataclass(frozen=True, slots=True)
class ServerHealth:
    settings: dict[str, str]
    """``HEALTH_SETTINGS`` by name, as ``pg_settings`` gives them (``on``/``off``, ...)."""
    no_autovacuum: list[str]
    """Tables of the store's schema with autovacuum turned off for them."""
    name_holder: str | None = None
    """Who holds the node name asked about (``store.nodename``), or None: its address."""


def server_health(url: str, node: str = "") -> ServerHealth:
    """Read what doctor judges about the server behind ``url``, and who holds the name
    ``node`` when given: blocking, read only."""
    try:
        with psycopg.connect(url, **_connect_kwargs(url)) as conn:
            settings = dict(conn.execute(_HEALTH_SQL, (list(HEALTH_SETTINGS),)).fetchall())
            tables = [name for (name,) in conn.execute(_NO_AUTOVACUUM_SQL).fetchall()]
            holder = conn.execute(HOLDER_SQL, (node,)).fetchone() if node else None
    except psycopg.Error as exc:
        raise StoreError(f"cannot connect to the PostgreSQL store: {exc}") from exc
    return ServerHealth(settings, tables, None if holder is None else holder_text(holder))
