"""The multi-node store: PostgreSQL through psycopg 3 (async) and a connection pool.

Theory of operation
-------------------
Several mxspool nodes share one database; everything a node knows lives in it.

Intake (group commit). ``accept_message`` puts the message on a queue and waits. One writer
task per store takes the first waiting accept and every other one already queued, and stores
them all in one transaction, each inside its own SAVEPOINT so one failing accept does not sink
the others. The COMMIT (synchronous_commit stays on: the WAL is flushed, and with synchronous
replication acknowledged) is shared by the batch; callers are woken only after it returns, so an
SMTP ``250`` never goes out before its message is durable. If the COMMIT fails, every accept of
the batch fails with StoreError and nothing of it is visible. A message whose body spilled to
disk is the exception: it is written on its own connection in its own transaction, 1 MiB at a
time, so a 150 MiB body never sits whole in memory nor holds up a batch of small messages.

Delivery. ``claim_due`` picks due recipients with ``SELECT ... FOR UPDATE SKIP LOCKED`` and
leases them (``lease_owner``, ``lease_until``) in the same statement, so two nodes never claim
the same row; a row still ``delivering`` after its lease ran out (its node died) is due again
for anyone. ``record_outcomes`` only touches rows still leased by the caller. The scheduler's
indexes are partial (open states only), so finished rows never slow a claim.

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
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
import psycopg.errors
from psycopg import AsyncConnection, sql
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from mxspool.envelope import domain_of
from mxspool.store import codec
from mxspool.store.base import (
    AcceptCallback,
    AttemptRecord,
    AuditEntry,
    ClaimedRecipient,
    ClientInfo,
    Conflict,
    DeliveryJob,
    DestinationDeferral,
    Domain,
    DomainChanges,
    DomainMode,
    DomainStatus,
    IncomingMessage,
    NotFound,
    QueueEntry,
    RecipientOutcome,
    RecipientRecord,
    RecipientState,
    ReportRow,
    StoredMessage,
    StoreError,
    TlsMode,
    submit_via_task,
)

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

_DOMAIN_COLUMNS = "name, mode, routes, use_mx, tls, rate, profile, created_at, released_at"
_NOT_FOUND_MESSAGE = "no message {}; 'mxspool queue list' shows the queue"
_NO_DOMAIN = "no domain {}; 'mxspool domain list' shows the domains"


def _migrations() -> list[tuple[int, str]]:
    folder = resources.files("mxspool.store") / "migrations" / "postgres"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text(encoding="utf-8")))
    return sorted(found)


def _domain_from_row(row: Sequence[Any]) -> Domain:
    name, mode, routes, use_mx, tls, rate, profile, created_at, released_at = row
    return Domain(
        name=name,
        mode=DomainMode(mode),
        routes=codec.load_routes(routes),
        use_mx=bool(use_mx),
        tls=TlsMode(tls),
        rate=rate,
        profile=profile,
        created_at=created_at,
        released_at=released_at,
    )


def _shown_state(state: str, released: bool, mode: str | None) -> str:
    if state == "pending" and not released and mode == "hold":
        return "held"
    return state


@dataclass(slots=True)
class _Accept:
    message: IncomingMessage
    future: asyncio.Future[None]


class PostgresStore:
    """The Store protocol on PostgreSQL (see the module docstring).

    ``url`` is a libpq URI (``postgresql://user@host:port/db?options=-csearch_path%3Dname``);
    every table lives in the first schema of the connection's search_path.
    """

    def __init__(self, url: str, *, min_connections: int = 2, max_connections: int = 10) -> None:
        self.url = url
        self._min = min_connections
        self._max = max_connections
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._queue: asyncio.Queue[_Accept | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None

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
                schema = await (await conn.execute("SELECT current_schema()")).fetchone()
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
                for version, script in _migrations():
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
        if self._writer is not None:
            self._queue.put_nowait(None)
            try:
                await self._writer
            finally:
                self._writer = None
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is not None and not job.future.done():
                job.future.set_exception(StoreError("the store is closing"))
        if self._pool is not None:
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

    # -- intake -------------------------------------------------------------------------
    def submit_message(self, message: IncomingMessage, on_done: AcceptCallback) -> None:
        submit_via_task(self, message, on_done)

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
        self._queue.put_nowait(_Accept(message, future))
        await future

    async def _write_loop(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH and not self._queue.empty():
                more = self._queue.get_nowait()
                if more is None:
                    stop = True
                    break
                batch.append(more)
            # A caller that gave up (its SMTP client left) before we started needs no commit.
            batch = [job for job in batch if not job.future.done()]
            if batch:
                try:
                    await self._commit_batch(batch)
                except Exception as exc:  # never let the writer die: callers would hang
                    error = StoreError(f"PostgreSQL commit failed: {exc}")
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(error)
            if stop:
                return

    async def _commit_batch(self, batch: list[_Accept]) -> None:
        failures: dict[int, BaseException] = {}
        domains: set[str] = set()
        async with self._connection() as conn, conn.transaction():
            try:
                # Fast path: the whole batch in one statement, inside one SAVEPOINT.
                async with conn.transaction():
                    await _insert_batch(conn, [job.message for job in batch])
            except Exception:
                # Some accept is bad. Replay them one SAVEPOINT each so it fails alone.
                for index, job in enumerate(batch):
                    try:
                        async with conn.transaction():
                            await _insert_message(conn, job.message)
                    except Exception as exc:
                        failures[index] = exc
            for index, job in enumerate(batch):
                if index not in failures:
                    domains |= _domains_of(job.message)
            await _notify_relay_mail(conn, domains)
        # Leaving the block ran COMMIT; only now is every message durable.
        for index, job in enumerate(batch):
            if job.future.done():
                continue
            failure = failures.get(index)
            if failure is None:
                job.future.set_result(None)
            elif isinstance(failure, StoreError):
                job.future.set_exception(failure)
            else:
                error = StoreError(f"cannot store message {job.message.id}: {failure}")
                job.future.set_exception(error)

    # -- domains ------------------------------------------------------------------------
    async def domains_generation(self) -> int:
        row = await self._fetchone("SELECT value FROM meta WHERE key = 'domains_generation'")
        return int(row[0]) if row else 0

    async def list_domains(self) -> list[Domain]:
        rows = await self._fetchall(f"SELECT {_DOMAIN_COLUMNS} FROM domains ORDER BY name")
        return [_domain_from_row(row) for row in rows]

    async def get_domain(self, name: str) -> Domain | None:
        row = await self._fetchone(
            f"SELECT {_DOMAIN_COLUMNS} FROM domains WHERE name = %s", (name.lower(),)
        )
        return _domain_from_row(row) if row else None

    async def add_domain(self, domain: Domain) -> None:
        now = time.time()
        try:
            async with self._connection() as conn, conn.transaction():
                await conn.execute(
                    f"INSERT INTO domains ({_DOMAIN_COLUMNS}, updated_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (
                        domain.name.lower(),
                        domain.mode.value,
                        codec.dump_routes(domain.routes),
                        domain.use_mx,
                        domain.tls.value,
                        domain.rate,
                        domain.profile,
                        domain.created_at or now,
                        domain.released_at,
                        now,
                    ),
                )
                await _domains_changed(conn, domain.name.lower(), domain.mode)
        except StoreError as exc:
            if isinstance(exc.__cause__, psycopg.errors.UniqueViolation):
                raise Conflict(
                    f"domain {domain.name} already exists; use 'mxspool domain route' to change it"
                ) from None
            raise

    async def update_domain(self, name: str, changes: DomainChanges) -> Domain:
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
        put("updated_at", time.time())
        query = sql.SQL("UPDATE domains SET {} WHERE name = %s RETURNING {}").format(
            sql.SQL(", ").join(sets), sql.SQL(_DOMAIN_COLUMNS)
        )
        async with self._connection() as conn, conn.transaction():
            row = await (await conn.execute(query, (*values, name.lower()))).fetchone()
            if row is None:
                raise NotFound(_NO_DOMAIN.format(name))
            domain = _domain_from_row(row)
            await _domains_changed(conn, domain.name, domain.mode)
        return domain

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

    # -- queue --------------------------------------------------------------------------
    async def list_queue(
        self,
        *,
        domain: str | None = None,
        state: str | None = None,
        limit: int = 100,
        after: int | None = None,
        search: str | None = None,
        tag: str | None = None,
    ) -> list[QueueEntry]:
        where = ["r.id > %s"]
        values: list[Any] = [after or 0]
        if tag:
            # Tags are stored comma-separated; the commas around both sides match whole tags.
            where.append("position(%s in ',' || m.tags || ',') > 0")
            values.append(f",{tag},")
        if domain:
            where.append("r.domain = %s")
            values.append(domain.lower())
        if state == "held":
            where.append("r.state = 'pending' AND NOT r.released AND d.mode = 'hold'")
        elif state == "pending":
            where.append(
                "r.state = 'pending' "
                "AND NOT (NOT r.released AND coalesce(d.mode, 'relay') = 'hold')"
            )
        elif state:
            where.append("r.state = %s")
            values.append(state)
        if search:
            # LIKE as in SQLite: case-insensitive for ASCII there, so ILIKE here.
            where.append("(r.rcpt ILIKE %s OR m.mail_from ILIKE %s OR m.message_id ILIKE %s)")
            pattern = "%" + _like_escape(search) + "%"
            values += [pattern, pattern, pattern]
        query = (
            "SELECT m.id, r.id, r.rcpt, r.domain, m.mail_from, m.size, m.received_at, r.state, "
            "r.released, d.mode, r.attempts, r.last_reply FROM recipients r "
            "JOIN messages m ON m.seq = r.message_seq LEFT JOIN domains d ON d.name = r.domain "
            f"WHERE {' AND '.join(where)} ORDER BY r.id LIMIT %s"
        )
        rows = await self._fetchall(query, (*values, limit))
        return [
            QueueEntry(
                message_id=row[0],
                recipient_id=row[1],
                rcpt=row[2],
                domain=row[3],
                mail_from=row[4],
                size=row[5],
                received_at=row[6],
                state=_shown_state(row[7], row[8], row[9]),
                attempts=row[10],
                last_reply=row[11],
            )
            for row in rows
        ]

    async def get_message(self, message_id: str) -> StoredMessage | None:
        async with self._connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT seq, id, received_at, mail_from, mail_params, size, sha256, "
                    "message_id, client_address, client_name, helo, tls_version, tls_cipher, "
                    "tags FROM messages WHERE id = %s",
                    (message_id,),
                )
            ).fetchone()
            if row is None:
                return None
            rows = await (
                await conn.execute(
                    "SELECT r.id, r.rcpt, r.domain, r.params, r.state, r.released, r.attempts, "
                    "r.next_attempt_at, r.last_reply, r.delivered_at, r.updated_at, d.mode "
                    "FROM recipients r LEFT JOIN domains d ON d.name = r.domain "
                    "WHERE r.message_seq = %s ORDER BY r.id",
                    (row[0],),
                )
            ).fetchall()
        recipients = tuple(
            RecipientRecord(
                id=r[0],
                address=r[1],
                domain=r[2],
                params=codec.load_rcpt_params(r[3]),
                state=RecipientState(r[4]),
                held=r[4] == "pending" and not r[5] and r[11] == "hold",
                attempts=r[6],
                next_attempt_at=r[7],
                last_reply=r[8],
                delivered_at=r[9],
                updated_at=r[10],
            )
            for r in rows
        )
        return StoredMessage(
            id=row[1],
            received_at=row[2],
            mail_from=row[3],
            mail_params=codec.load_mail_params(row[4]),
            size=row[5],
            sha256=row[6],
            message_id=row[7],
            client=ClientInfo(
                address=row[8],
                hostname=row[9],
                helo=row[10],
                tls_version=row[11],
                tls_cipher=row[12],
            ),
            tags=tuple(tag for tag in row[13].split(",") if tag),
            recipients=recipients,
        )

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
                return
            chunk += 1
            data = bytes(piece[0])
            if data:
                yield data

    async def read_small_bodies(
        self, message_ids: Sequence[str], max_size: int
    ) -> dict[str, bytes]:
        ids = list(message_ids)
        if not ids:
            return {}
        # Bodies this small are one chunk (chunks are 1 MiB); a size check keeps it that way.
        rows = await self._fetchall(
            "SELECT m.id, b.data FROM messages m JOIN bodies b ON b.message_seq = m.seq "
            "AND b.chunk = 0 WHERE m.id = ANY(%s) AND m.size <= %s AND m.size <= %s",
            (ids, max_size, BODY_CHUNK),
        )
        return {row[0]: bytes(row[1]) for row in rows}

    async def attempts(self, message_id: str) -> list[AttemptRecord]:
        rows = await self._fetchall(
            "SELECT r.rcpt, a.at, a.destination, a.outcome, a.reply FROM attempts a "
            "JOIN recipients r ON r.id = a.recipient_id "
            "JOIN messages m ON m.seq = r.message_seq WHERE m.id = %s ORDER BY a.id",
            (message_id,),
        )
        return [
            AttemptRecord(recipient=r[0], at=r[1], destination=r[2], outcome=r[3], reply=r[4])
            for r in rows
        ]

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
            # One snapshot for the three queries, so the numbers agree with each other.
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            domains = {
                name: DomainMode(mode)
                for name, mode in await (
                    await conn.execute("SELECT name, mode FROM domains")
                ).fetchall()
            }
            counts: dict[str, dict[str, int]] = {name: {} for name in domains}
            for name, state, released, count in await (
                await conn.execute(
                    "SELECT domain, state, released, count(*) FROM recipients "
                    "GROUP BY domain, state, released"
                )
            ).fetchall():
                bucket = counts.setdefault(name, {})
                shown = _shown_state(state, released, domains.get(name, DomainMode.RELAY).value)
                bucket[shown] = bucket.get(shown, 0) + int(count)
            oldest: dict[str, float] = {
                name: first
                for name, first in await (
                    await conn.execute(
                        "SELECT r.domain, min(m.received_at) FROM recipients r "
                        "JOIN messages m ON m.seq = r.message_seq "
                        "WHERE r.state IN ('pending', 'delivering') GROUP BY r.domain"
                    )
                ).fetchall()
            }
            recent: dict[str, int] = {
                name: int(count)
                for name, count in await (
                    await conn.execute(
                        "SELECT domain, count(*) FROM recipients WHERE state = 'delivered' "
                        "AND delivered_at >= %s GROUP BY domain",
                        (now - 60.0,),
                    )
                ).fetchall()
            }
        result = []
        for name in sorted(counts):
            bucket = counts[name]
            first = oldest.get(name)
            result.append(
                DomainStatus(
                    domain=name,
                    mode=domains.get(name, DomainMode.RELAY),
                    held=bucket.get("held", 0),
                    pending=bucket.get("pending", 0),
                    delivering=bucket.get("delivering", 0),
                    delivered=bucket.get("delivered", 0),
                    parked=bucket.get("parked", 0),
                    bounced=bucket.get("bounced", 0),
                    discarded=bucket.get("discarded", 0),
                    oldest_pending_age_s=None if first is None else max(0.0, now - first),
                    delivered_last_minute=recent.get(name, 0),
                )
            )
        return result

    async def report(self, domain: str | None = None) -> AsyncIterator[ReportRow]:
        after = 0
        while True:
            query = (
                "SELECT r.id, m.id, m.message_id, m.mail_from, r.rcpt, m.size, m.sha256, "
                "m.received_at, r.state, r.attempts, r.delivered_at, r.last_reply, "
                "r.released, d.mode FROM recipients r "
                "JOIN messages m ON m.seq = r.message_seq "
                "LEFT JOIN domains d ON d.name = r.domain WHERE r.id > %s"
            )
            values: list[Any] = [after]
            if domain:
                query += " AND r.domain = %s"
                values.append(domain.lower())
            query += " ORDER BY r.id LIMIT 1000"
            rows = await self._fetchall(query, values)
            if not rows:
                return
            for row in rows:
                yield ReportRow(
                    id=row[1],
                    message_id=row[2],
                    mail_from=row[3],
                    rcpt=row[4],
                    size=row[5],
                    sha256=row[6],
                    received_at=row[7],
                    state=_shown_state(row[8], row[12], row[13]),
                    attempts=row[9],
                    delivered_at=row[10],
                    remote_reply=row[11],
                )
            after = rows[-1][0]

    # -- audit --------------------------------------------------------------------------
    async def record_audit(self, actor: str, action: str, target: str, detail: str = "") -> None:
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO audit (at, actor, action, target, detail) VALUES (%s, %s, %s, %s, %s)",
                (time.time(), actor, action, target, detail),
            )

    async def list_audit(self, limit: int = 100) -> list[AuditEntry]:
        rows = await self._fetchall(
            "SELECT at, actor, action, target, detail FROM audit ORDER BY id DESC LIMIT %s",
            (limit,),
        )
        return [AuditEntry(*row) for row in rows]

    # -- migration toolkit ----------------------------------------------------------------
    async def add_recipients(
        self, domain: str, addresses: Sequence[str], replace: bool = False
    ) -> int:
        name = domain.lower()
        lowered = sorted({address.lower() for address in addresses})
        async with self._connection() as conn, conn.transaction():
            found = await (
                await conn.execute("SELECT 1 FROM domains WHERE name = %s FOR UPDATE", (name,))
            ).fetchone()
            if found is None:
                raise NotFound(_NO_DOMAIN.format(domain))
            if replace:
                await conn.execute("DELETE FROM recipient_lists WHERE domain = %s", (name,))
            await conn.execute(
                "INSERT INTO recipient_lists (domain, address) "
                "SELECT %s, unnest(%s::text[]) ON CONFLICT (domain, address) DO NOTHING",
                (name, lowered),
            )
            await _domains_changed(conn, None, None)
            row = await (
                await conn.execute(
                    "SELECT count(*) FROM recipient_lists WHERE domain = %s", (name,)
                )
            ).fetchone()
            return int(row[0]) if row else 0

    async def recipient_list(self, domain: str) -> list[str]:
        rows = await self._fetchall(
            "SELECT address FROM recipient_lists WHERE domain = %s ORDER BY address",
            (domain.lower(),),
        )
        return [row[0] for row in rows]

    async def clear_recipients(self, domain: str) -> int:
        async with self._connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "DELETE FROM recipient_lists WHERE domain = %s", (domain.lower(),)
            )
            await _domains_changed(conn, None, None)
            return cursor.rowcount

    async def recipient_lists(self) -> dict[str, frozenset[str]]:
        rows = await self._fetchall("SELECT domain, address FROM recipient_lists")
        found: dict[str, set[str]] = {}
        for domain, address in rows:
            found.setdefault(domain, set()).add(address)
        return {domain: frozenset(items) for domain, items in found.items()}

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
        expire = deferral.expire_received_before
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
                " AND ((r.state = 'pending'"
                "   AND (r.next_attempt_at <> %(until)s OR m.received_at <= %(cutoff)s))"
                "  OR (r.state = 'delivering' AND r.lease_until < %(now)s))",
                {
                    "domain": domain.lower(),
                    "until": deferral.until,
                    "reply": deferral.reply,
                    "now": deferral.now,
                    "cutoff": expire if expire is not None else -1.0,
                    "expired": deferral.expired_reply,
                },
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
            # The query's shape follows the mode so a held domain's claim uses the canary
            # index; the mode is checked again inside the statement (one snapshot), so a
            # concurrent hold or release cannot make it claim held mail.
            if mode_row[0] == "relay":
                pending = (
                    "(r.released OR EXISTS (SELECT 1 FROM domains d "
                    "WHERE d.name = %(domain)s AND d.mode = 'relay'))"
                )
            else:
                pending = "r.released"
                # A dead worker's claims in a domain put back on hold are held again, not sent.
                await conn.execute(
                    "UPDATE recipients SET state = 'pending', lease_owner = NULL, "
                    "lease_until = NULL, updated_at = %s WHERE domain = %s AND state = "
                    "'delivering' AND lease_until < %s AND NOT released",
                    (now, name, now),
                )
            cursor = await conn.execute(
                "WITH picked AS ("
                " SELECT r.id FROM recipients r WHERE r.domain = %(domain)s"
                " AND r.state IN ('pending', 'delivering') AND ("
                f"  (r.state = 'pending' AND r.next_attempt_at <= %(now)s AND {pending})"
                "  OR (r.state = 'delivering' AND r.lease_until < %(now)s))"
                " ORDER BY r.id LIMIT %(limit)s FOR UPDATE OF r SKIP LOCKED)"
                " UPDATE recipients r SET state = 'delivering', lease_owner = %(owner)s,"
                " lease_until = %(until)s, updated_at = %(now)s"
                " FROM picked, messages m WHERE r.id = picked.id AND m.seq = r.message_seq"
                " RETURNING r.message_seq, m.id, m.mail_from, m.mail_params, m.size,"
                " m.received_at, r.id, r.rcpt, r.params, r.attempts",
                {
                    "domain": name,
                    "now": now,
                    "limit": limit,
                    "owner": owner,
                    "until": now + lease_seconds,
                },
            )
            rows = await cursor.fetchall()
        rows.sort(key=lambda row: int(row[6]))
        jobs: dict[int, DeliveryJob] = {}
        for seq, mid, mail_from, params, size, received_at, rid, rcpt, rparams, tries in rows:
            recipient = ClaimedRecipient(rid, rcpt, codec.load_rcpt_params(rparams), tries)
            existing = jobs.get(seq)
            if existing is None:
                jobs[seq] = DeliveryJob(
                    message_id=mid,
                    domain=name,
                    mail_from=mail_from,
                    mail_params=codec.load_mail_params(params),
                    size=size,
                    received_at=received_at,
                    recipients=(recipient,),
                )
            else:
                jobs[seq] = DeliveryJob(
                    message_id=existing.message_id,
                    domain=existing.domain,
                    mail_from=existing.mail_from,
                    mail_params=existing.mail_params,
                    size=existing.size,
                    received_at=existing.received_at,
                    recipients=(*existing.recipients, recipient),
                )
        return list(jobs.values())

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
                " %(dests)s::text[]) AS o(id, state, reply, counted, next_at, destination)),"
                " changed AS (UPDATE recipients r SET state = o.state, last_reply = o.reply,"
                "  attempts = r.attempts + CASE WHEN o.counted THEN 1 ELSE 0 END,"
                "  next_attempt_at = o.next_at,"
                "  delivered_at = CASE WHEN o.state = 'delivered' THEN %(now)s END,"
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
                    "now": now,
                    "owner": owner,
                },
            )

    # -- wake-ups -----------------------------------------------------------------------
    async def notifications(self) -> AsyncIterator[str]:
        """Payloads NOTIFYed on the ``mxspool`` channel, by this node or any other.

        ``domains``: some domain changed (reload, compare domains_generation).
        ``mail:<domain>``: new due mail for the domain (accepts in relay mode, a release,
        a canary, a retry). ``resync``: the listener (re)connected and may have missed
        notifications: re-check everything. Reconnects on its own with backoff; runs until
        the consumer stops iterating. Polling stays the safety net: a notification is a hint.
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
    return {domain_of(recipient.address) for recipient in message.envelope.recipients}


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


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


async def _insert_batch(conn: Conn, messages: list[IncomingMessage]) -> None:
    """Insert in-memory messages, their recipients and bytes, all in one statement."""
    m_cols: dict[str, list[Any]] = {name: [] for name in codec.MESSAGE_COLUMNS}
    r_cols: dict[str, list[Any]] = {"mid": [], "rcpt": [], "domain": [], "params": [], "at": []}
    b_mid: list[str] = []
    b_data: list[bytes] = []
    for message in messages:
        for name, value in codec.message_row(message).items():
            m_cols[name].append(value)
        for recipient in message.envelope.recipients:
            address, domain, params = codec.recipient_row(recipient)
            r_cols["mid"].append(message.id)
            r_cols["rcpt"].append(address)
            r_cols["domain"].append(domain)
            r_cols["params"].append(params)
            r_cols["at"].append(message.received_at)
        data = message.body.getvalue()
        if data is None:
            raise StoreError(f"message {message.id} spilled to disk; it is stored on its own")
        b_mid.append(message.id)
        b_data.append(data)
    await conn.execute(
        "WITH m AS (INSERT INTO messages (id, received_at, mail_from, mail_params, size,"
        " sha256, message_id, client_address, client_name, helo, tls_version, tls_cipher, tags)"
        " SELECT id, received_at, mail_from, mail_params, size, sha256, message_id,"
        "  client_address, client_name, helo, tls_version, tls_cipher, tags"
        " FROM unnest(%(id)s::text[], %(received_at)s::float8[], %(mail_from)s::text[],"
        "  %(mail_params)s::text[], %(size)s::bigint[], %(sha256)s::text[],"
        "  %(message_id)s::text[], %(client_address)s::text[], %(client_name)s::text[],"
        "  %(helo)s::text[], %(tls_version)s::text[], %(tls_cipher)s::text[], %(tags)s::text[])"
        " WITH ORDINALITY AS x(id, received_at, mail_from, mail_params, size, sha256,"
        "  message_id, client_address, client_name, helo, tls_version, tls_cipher, tags, n)"
        " ORDER BY n RETURNING seq, id),"
        " r AS (INSERT INTO recipients (message_seq, rcpt, domain, params, updated_at)"
        " SELECT m.seq, x.rcpt, x.domain, x.params, x.at"
        " FROM unnest(%(r_mid)s::text[], %(r_rcpt)s::text[], %(r_domain)s::text[],"
        "  %(r_params)s::text[], %(r_at)s::float8[]) WITH ORDINALITY"
        "  AS x(mid, rcpt, domain, params, at, n)"
        " JOIN m ON m.id = x.mid ORDER BY x.n),"
        " b AS (INSERT INTO bodies (message_seq, chunk, data)"
        " SELECT m.seq, 0, x.data FROM unnest(%(b_mid)s::text[], %(b_data)b::bytea[])"
        "  AS x(mid, data) JOIN m ON m.id = x.mid)"
        " SELECT count(*) FROM m",
        {
            **m_cols,
            "r_mid": r_cols["mid"],
            "r_rcpt": r_cols["rcpt"],
            "r_domain": r_cols["domain"],
            "r_params": r_cols["params"],
            "r_at": r_cols["at"],
            "b_mid": b_mid,
            "b_data": b_data,
        },
    )


async def _insert_message(conn: Conn, message: IncomingMessage) -> None:
    """Insert the message, its recipients and its bytes (the caller owns the transaction)."""
    envelope = message.envelope
    body = message.body
    in_memory = body.getvalue()
    rows = [codec.recipient_row(recipient) for recipient in envelope.recipients]
    cursor = await conn.execute(
        "WITH m AS (INSERT INTO messages (id, received_at, mail_from, mail_params, size, sha256,"
        " message_id, client_address, client_name, helo, tls_version, tls_cipher, tags)"
        " VALUES (%(id)s, %(received_at)s, %(mail_from)s, %(mail_params)s, %(size)s,"
        " %(sha256)s, %(message_id)s, %(client_address)s, %(client_name)s, %(helo)s,"
        " %(tls_version)s, %(tls_cipher)s, %(tags)s) RETURNING seq),"
        " r AS (INSERT INTO recipients (message_seq, rcpt, domain, params, updated_at)"
        " SELECT m.seq, x.rcpt, x.domain, x.params, %(received_at)s FROM m,"
        " unnest(%(rcpts)s::text[], %(domains)s::text[], %(params)s::text[])"
        " WITH ORDINALITY AS x(rcpt, domain, params, n) ORDER BY x.n),"
        " b AS (INSERT INTO bodies (message_seq, chunk, data)"
        " SELECT m.seq, 0, %(data)b::bytea FROM m WHERE %(data)b::bytea IS NOT NULL)"
        " SELECT seq FROM m",
        {
            **codec.message_row(message),
            "rcpts": [address for address, _, _ in rows],
            "domains": [domain for _, domain, _ in rows],
            "params": [params for _, _, params in rows],
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
