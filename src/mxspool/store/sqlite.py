"""The embedded store: one SQLite file in WAL mode with synchronous=FULL.

Theory of operation
-------------------
Every write goes through one writer thread that owns the only writing connection. It takes
the first job waiting in its queue, then every other job already waiting, and runs them all in
one transaction, each inside its own SAVEPOINT so one failing job does not sink the others.
The COMMIT (with synchronous=FULL, an fsync of the WAL) is shared by the whole batch: this is
group commit. Callers awaiting a job are woken only after that COMMIT returns, so an SMTP
``250`` never goes out before its message is on stable storage. If the COMMIT fails, every job
of the batch fails and nothing of it is visible.

Accepted messages whose bodies are in memory (the intake's hot path) take the same road on a
second, C thread when ``_groupcommit`` is built (see _groupcommit.c): same group commit, same
savepoints, same synchronous=FULL, but without the GIL, whose hand-overs between the writer
thread and the busy event loop were the commit's main cost. The two threads take turns on the
database (``Committer.lock``), so there is still one writer at a time. Outcomes reach the loop
through a pipe the loop watches, or sooner: the intake asks at every event it handles
(``deliver_ready``: one load in C, no lock and no system call, when there is nothing). Its
connection gathers SQLite's small sequential writes (two per WAL frame) into large ones through
a VFS of its own (_coalesce.c).

Reads run in the default thread pool on per-thread read-only connections; WAL lets them
proceed while the writer commits.

Checkpoints (copying the WAL into the main file) run in a thread of their own and wait for a
pause: a burst of mail is committed to the WAL only, and copied once commits have paused for
``CHECKPOINT_QUIET``. A long run of commits is copied while it goes on once the WAL passes
``WAL_SOFT_LIMIT``, and a commit past ``WAL_HARD_PAGES`` finishes the copy so that the WAL
starts again from its beginning. A clean close copies what is left. Copying every 20 ms as
the mail came in (before) made every commit compete with the copy's writes and its fsync of
the main file: ~14% of the 100 KiB accept benchmark's rate (medians of 5 alternating runs).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mxspool.actor import audit_actor
from mxspool.addresses import address_key, ascii_lower
from mxspool.store import codec, counts, purge, queries
from mxspool.store.base import (
    FLUSH_ALL,
    HELD_UNTIL,
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
    RecipientState,
    StageEvent,
    StoreError,
)
from mxspool.store.schema import migration_scripts

try:
    from mxspool.store import _groupcommit
except ImportError:  # not built (no C compiler or no sqlite3.h): the Python writer does it all
    _groupcommit = None  # type: ignore[assignment]

# Whether stores opened from now on commit accepts on the C thread; tests turn it off to run
# the same suite through the Python writer.
ACCELERATED = _groupcommit is not None

T = TypeVar("T")
log = logging.getLogger(__name__)

BLOB_CHUNK = 1 << 20
MAX_BATCH = 512
# Checkpoints: see the module docstring and _checkpoint_loop.
CHECKPOINT_LOOK = 0.02
"""Seconds between the checkpoint thread's looks (``PRAGMA data_version``: no I/O)."""
CHECKPOINT_QUIET = 0.1
"""No commit for this long: the thread copies the WAL into the main file."""
WAL_SOFT_LIMIT = 256 * 1024 * 1024
"""Past this many bytes of WAL the thread copies at every look, while commits go on."""
WAL_HARD_PAGES = 2 * WAL_SOFT_LIMIT // 4096
"""Past this many pages of WAL a commit finishes the copy itself (SQLite's autocheckpoint), so
the WAL starts again from its beginning under sustained intake: what the thread has not copied
yet, which is little, since it started at half of this."""
WAL_KEEP = 64 * 1024 * 1024
"""The WAL file is cut back to this size whenever it starts again (journal_size_limit)."""

_OPEN_STATES = ("pending", "delivering")


# SQLite's default SQLITE_MAX_VARIABLE_NUMBER since 3.32: a batch of accepts (15 values
# each) must fit one INSERT, so that it is one transaction.
MAX_VARIABLES = 32766
assert MAX_BATCH * 15 <= MAX_VARIABLES


@dataclass(slots=True)
class _Job:
    work: Callable[[sqlite3.Connection], Any]
    future: Future[Any]
    # Set for accepts: the writer inserts all accepts of a batch with one statement.
    message: IncomingMessage | None = None
    # Set by submit_message: called on the loop instead of settling the future.
    on_done: AcceptCallback | None = None
    loop: asyncio.AbstractEventLoop | None = None


DEFER_SLICE = 5_000
"""Rows per write of ``defer_destination``: tens of milliseconds of the writer's time each.
A million-row deferral then delays an accept by ~0.1 s at most instead of ~10 s (measured)."""

_HOLD_MATCH = (
    "(lower(rcpt) = :address OR (:prefix <> '' AND substr(lower(rcpt), 1, length(:prefix))"
    " = :prefix AND substr(lower(rcpt), -length(:suffix)) = :suffix))"
)
"""A recipient row of a recipient hold: the address, or a sub-address (recipient_holds)."""


def _size(path: Path) -> int:
    """A file's size; 0 when it does not exist."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def sqlite_path(url: str) -> Path:
    """The file named by a sqlite:/// URL (relative paths are relative to the cwd)."""
    if not url.startswith("sqlite:///"):
        raise StoreError(f"not a SQLite store URL: {url!r}")
    return Path(url.removeprefix("sqlite:///"))


_READER_PRAGMAS = ("PRAGMA busy_timeout = 10000", "PRAGMA foreign_keys = ON")
_WRITER_PRAGMAS = (
    *_READER_PRAGMAS,
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    # Checkpoints run in their own thread (see _checkpoint_loop) so copying pages into the
    # main file rarely stalls a commit. But under steady intake that PASSIVE checkpoint never
    # catches up with the last frame, and the WAL only starts again from its beginning once a
    # checkpoint has: it would grow by ~100 MB a second (new blocks, new page cache, and a
    # longer recovery after a crash). So a writer whose commit leaves the WAL past
    # WAL_HARD_PAGES copies the few frames the background has not (as the only writer, it
    # finishes) and the next transaction restarts the WAL.
    f"PRAGMA wal_autocheckpoint = {WAL_HARD_PAGES}",
    f"PRAGMA journal_size_limit = {WAL_KEEP}",
)


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in _READER_PRAGMAS if readonly else _WRITER_PRAGMAS:
        conn.execute(pragma)
    return conn


def _claim_choice(*lanes: tuple[str, str]) -> str:
    """The messages a claim takes: the first ``:limit`` rows of the lanes (index, WHERE ...
    ORDER BY over recipients ``r``), each lane cut at ``:limit``, merged by id so an old retry
    is not starved by a stream of new mail. Each lane is an index range that holds only due
    candidates in the order wanted: never a walk over a domain's whole backlog (one OR over
    two indexes, sorted in full, made every claim a quarter of a second at a million held)."""
    picks = " UNION ALL ".join(
        f"SELECT id, message_seq FROM (SELECT r.id, r.message_seq FROM recipients r"
        f" INDEXED BY {index} WHERE {where} LIMIT :limit)"
        for index, where in lanes
    )
    return (
        f"SELECT DISTINCT message_seq FROM (SELECT message_seq FROM ({picks})"
        " ORDER BY id LIMIT :limit)"
    )


_LAPSED = (
    "recipients_lease",
    "r.domain = :domain AND r.state = 'delivering' AND r.lease_until < :now ORDER BY r.lease_until",
)
_CLAIM_CHOICE_RELAY = _claim_choice(
    # Due since it arrived or was released or retried now (next_attempt_at 0), oldest first:
    # recipients_due (domain, next_attempt_at) ends with the rowid, so this is a range of the
    # index already in id order.
    (
        "recipients_due",
        "r.domain = :domain AND r.state = 'pending' AND r.next_attempt_at = 0 AND r.held = 0"
        " ORDER BY r.id",
    ),
    # Retries whose time has come, the earliest first.
    (
        "recipients_due",
        "r.domain = :domain AND r.state = 'pending' AND r.next_attempt_at > 0"
        " AND r.next_attempt_at <= :now AND r.held = 0 ORDER BY r.next_attempt_at, r.id",
    ),
    _LAPSED,
)
_CLAIM_CHOICE_HELD = _claim_choice(
    # A held domain sends only its canaries (released = 1), a handful of rows. The state IN
    # (...) is recipients_canary's own condition, repeated so that the partial index applies.
    (
        "recipients_canary",
        "r.domain = :domain AND r.released = 1 AND r.state IN ('pending', 'delivering')"
        " AND r.state = 'pending' AND r.next_attempt_at <= :now AND r.held = 0 ORDER BY r.id",
    ),
    _LAPSED,
)


class SqliteStore(queries.ReadSide):
    """The Store protocol on one SQLite file (see the module docstring); the reads it shares
    with PostgreSQL come from ``queries.ReadSide``."""

    dialect = queries.SQLITE

    def __init__(self, url: str) -> None:
        self.path = sqlite_path(url)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._checkpointer: threading.Thread | None = None
        self._closing = threading.Event()
        self._committer: _groupcommit.Committer | None = None

    # -- lifecycle ----------------------------------------------------------------------
    async def open(self) -> None:
        await asyncio.to_thread(self._prepare)
        if ACCELERATED:
            try:
                self._committer = _groupcommit.Committer(
                    str(self.path), ";".join(_WRITER_PRAGMAS), _COMMIT_ONE, MAX_BATCH
                )
            except OSError as exc:
                raise StoreError(f"cannot open the SQLite store at {self.path}: {exc}") from exc
            asyncio.get_running_loop().add_reader(self._committer.fileno(), self._deliver_commits)
        self._writer = threading.Thread(target=self._write_loop, name="sqlite-writer", daemon=True)
        self._writer.start()
        self._closing.clear()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="sqlite-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        """Copy committed WAL pages into the main file, off the commit path: once commits have
        paused for CHECKPOINT_QUIET, and at every look while the WAL is past WAL_SOFT_LIMIT.

        PASSIVE never blocks the writer or readers; it copies what it can. Once a checkpoint
        has caught up, the next write transaction starts the WAL from its beginning again (and
        cuts the file back to WAL_KEEP). ``PRAGMA data_version`` on this thread's own
        connection changes whenever another connection commits, so a look costs no I/O.
        """
        conn: sqlite3.Connection | None = None
        wal = Path(f"{self.path}-wal")
        version: int | None = None
        changed_at = time.monotonic()
        copied = True  # nothing committed since the last complete checkpoint
        while not self._closing.wait(CHECKPOINT_LOOK):
            try:
                if conn is None:
                    conn = _connect(self.path)
                now = time.monotonic()
                seen = conn.execute("PRAGMA data_version").fetchone()[0]
                if seen != version:
                    version, changed_at, copied = seen, now, False
                quiet = not copied and now - changed_at >= CHECKPOINT_QUIET
                if not quiet and _size(wal) < WAL_SOFT_LIMIT:
                    continue
                # (busy, frames in the WAL, frames copied)
                _busy, frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                copied = quiet and frames == done
            except sqlite3.Error as exc:
                log.warning("SQLite checkpoint failed (will retry): %s", exc)
                if conn is not None:
                    conn.close()
                    conn = None
        if conn is not None:
            conn.close()

    def _prepare(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = _connect(self.path)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(
                f"cannot open the SQLite store at {self.path}: {exc}; check that the directory "
                "exists and is writable"
            ) from exc
        try:
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            for version, script in migration_scripts("sqlite"):
                if version <= current:
                    continue
                # executescript commits on its own; the version bump is inside the script's
                # transaction so a crash never leaves a half-applied migration recorded.
                conn.executescript(
                    f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {version};\nCOMMIT;"
                )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot migrate the SQLite store at {self.path}: {exc}") from exc
        finally:
            conn.close()

    async def close(self) -> None:
        self._closing.set()
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.join)
            self._checkpointer = None
        if self._writer is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        committer = self._committer
        if committer is not None:
            # Commits what is queued, then answers everyone still waiting.
            asyncio.get_running_loop().remove_reader(committer.fileno())
            await asyncio.to_thread(committer.close)
            self._deliver_commits()
            self._committer = None
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        await asyncio.to_thread(self._fold_wal)

    def _fold_wal(self) -> None:
        """After the last commit of a clean close: copy the WAL into the main file (PASSIVE:
        it waits for nobody), so the next start replays nothing and a stopped spool's file
        holds everything. A burst's WAL can be WAL_SOFT_LIMIT bytes: about a second."""
        try:  # mode=rw: a spool file moved away meanwhile (a restore) is not created again
            conn = sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, isolation_level=None)
        except sqlite3.Error:
            return
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:  # the WAL stays; the next open replays it
            log.warning("could not copy the SQLite WAL into the store at close: %s", exc)
        finally:
            conn.close()

    def free_bytes(self) -> int | None:
        try:
            stats = os.statvfs(self.path.parent)
        except OSError:
            return None
        return stats.f_bavail * stats.f_frsize

    # -- the writer ---------------------------------------------------------------------
    def _write_loop(self) -> None:
        conn: sqlite3.Connection | None = None
        while True:
            job = self._jobs.get()
            if job is None:
                break
            batch = [job]
            while len(batch) < MAX_BATCH:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._jobs.put(None)
                    break
                batch.append(more)
            if conn is None:
                try:
                    conn = _connect(self.path)
                except sqlite3.Error as exc:
                    error = StoreError(f"cannot open the store: {exc}")
                    _settle([(item, None, error) for item in batch])
                    continue
            committer = self._committer
            if committer is not None:
                committer.lock()  # the C commit thread's turn ends; ours begins
            try:
                committed = self._run_batch(conn, batch)
            finally:
                if committer is not None:
                    committer.unlock()
            if not committed:
                # A failed COMMIT can leave the connection unusable (I/O error); start afresh.
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> bool:
        """Commit a batch of jobs: accepts first, then everything else.

        Accepts whose bodies are in memory go in one statement, in autocommit mode (see
        migration 0005_accept_rows.sql): a statement is a GIL round trip and the event loop
        holds the GIL most of the time, so statements, not rows, set the writer's pace.
        Everything else (and accepts again, one by one, if that statement fails, so that only
        the message at fault fails) runs in one transaction, each job on its own savepoint.
        """
        # A job cancelled before it ran is skipped: a commit nobody waits for.
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]
        together: list[_Job] = []
        others: list[_Job] = []
        for job in live:
            fits = job.message is not None and not job.message.body.spilled
            (together if fits else others).append(job)
        one_by_one = live
        if together:
            try:
                _insert_accept_rows(conn, [job.message for job in together if job.message])
            except Exception:
                pass  # retried below, each on its own
            else:
                _settle([(job, None, None) for job in together])
                one_by_one = others
        if not one_by_one:
            return True
        results: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in one_by_one:
                conn.execute("SAVEPOINT job")
                try:
                    value = job.work(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    failure: BaseException = exc
                    if isinstance(exc, sqlite3.Error):
                        failure = StoreError(f"store write failed: {exc}")
                        failure.__cause__ = exc
                    results.append((job, None, failure))
                else:
                    conn.execute("RELEASE job")
                    results.append((job, value, None))
            conn.execute("COMMIT")
        except Exception as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            error = StoreError(f"commit failed: {exc}")
            _settle([(job, None, error) for job in one_by_one])
            return False
        _settle(results)
        return True

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None:
            raise StoreError("the store is not open")
        future: Future[T] = Future()
        self._jobs.put(_Job(work, future))
        return await asyncio.wrap_future(future)

    # -- readers ------------------------------------------------------------------------
    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path, readonly=True)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            conn = self._reader()
            conn.execute("BEGIN")
            try:
                return work(conn)
            finally:
                conn.execute("COMMIT")

        try:
            return await asyncio.to_thread(run)
        except sqlite3.Error as exc:
            raise StoreError(f"store read failed: {exc}") from exc

    async def _fetch(self, query: str, params: Sequence[Any]) -> list[queries.Row]:
        return await self._read(lambda conn: conn.execute(query, params).fetchall())

    # -- intake -------------------------------------------------------------------------
    async def accept_message(self, message: IncomingMessage) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.submit_message(message, functools.partial(_settle_future, future))
        await future

    def submit_message(self, message: IncomingMessage, on_done: AcceptCallback) -> None:
        if self._writer is None:
            raise StoreError("the store is not open")
        if self._committer is not None and not message.body.spilled:
            self._committer.submit(_accept_row(message, digest=False), on_done)
            return
        # The Python writer needs the digest: computed here, on the loop (mxspool.body), since in
        # the writer thread every hashlib call would hand the GIL back and forth.
        _ = message.body.sha256
        loop = asyncio.get_running_loop()
        work = functools.partial(_insert_message, message=message)
        self._jobs.put(_Job(work, Future(), message, on_done, loop))

    def deliver_ready(self) -> None:
        committer = self._committer
        if committer is not None and committer.pending():
            self._deliver_commits()

    def _deliver_commits(self) -> None:
        """On the loop, when the commit thread has finished jobs: tell their submitters."""
        if self._committer is None:
            return
        for on_done, error in self._committer.collect():
            try:
                on_done(None if error is None else StoreError(error))
            except Exception:
                log.exception("an accept callback failed")

    # -- domains ------------------------------------------------------------------------
    async def add_domain(self, domain: Domain) -> None:
        def work(conn: sqlite3.Connection) -> None:
            now = time.time()
            try:
                conn.execute(
                    f"INSERT INTO domains ({codec.DOMAIN_COLUMNS}, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    codec.domain_row(domain, now),
                )
            except sqlite3.IntegrityError:
                raise Conflict(
                    f"domain {domain.name} already exists; use 'mxspool domain route' to change it"
                ) from None
            _bump_generation(conn)

        await self._write(work)

    async def update_domain(self, name: str, changes: DomainChanges) -> Domain:
        return await self._write(functools.partial(_update_domain_row, name=name, changes=changes))

    async def remove_domain(self, name: str, force: bool = False) -> None:
        def work(conn: sqlite3.Connection) -> None:
            name_l = name.lower()
            if conn.execute("SELECT 1 FROM domains WHERE name = ?", (name_l,)).fetchone() is None:
                raise NotFound(f"no domain {name}; 'mxspool domain list' shows the domains")
            open_count = conn.execute(
                "SELECT count(*) FROM recipients WHERE domain = ? AND state IN "
                "('pending', 'delivering', 'parked')",
                (name_l,),
            ).fetchone()[0]
            if open_count and not force:
                raise Conflict(
                    f"domain {name} still has {open_count} recipients not delivered; release "
                    "and drain them first, or use --force (the mail stays in the store but "
                    "is no longer delivered)"
                )
            conn.execute("DELETE FROM domains WHERE name = ?", (name_l,))
            conn.execute("DELETE FROM migration_domains WHERE domain = ?", (name_l,))
            _bump_generation(conn)

        await self._write(work)

    async def release_recipient(self, domain: str, address: str) -> int:
        def work(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "UPDATE recipients SET released = 1, next_attempt_at = 0, updated_at = ? "
                "WHERE domain = ? AND lower(rcpt) = lower(?) AND state = 'pending'",
                (time.time(), domain.lower(), address),
            )
            return cursor.rowcount

        return await self._write(work)

    async def hold_recipient(self, hold: RecipientHold) -> int:
        def work(conn: sqlite3.Connection) -> int:
            conn.execute(
                "INSERT INTO recipient_holds (address, domain, prefix, suffix, created_at, actor)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (address) DO NOTHING",
                (hold.address, hold.domain, hold.prefix, hold.suffix, hold.created_at, hold.actor),
            )
            cursor = conn.execute(
                "UPDATE recipients SET held = 1, next_attempt_at = :until, updated_at = :now"
                " WHERE domain = :domain AND state = 'pending' AND held = 0"
                f" AND {_HOLD_MATCH}",
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

        return await self._write(work)

    async def release_recipient_hold(self, address: str) -> int | None:
        def work(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(
                "DELETE FROM recipient_holds WHERE address = ? RETURNING domain, prefix, suffix",
                (address.lower(),),
            ).fetchone()
            if row is None:
                return None
            domain, prefix, suffix = row
            cursor = conn.execute(
                "UPDATE recipients INDEXED BY recipients_held SET held = 0, next_attempt_at = 0,"
                f" updated_at = :now WHERE domain = :domain AND held = 1 AND {_HOLD_MATCH}",
                {
                    "now": time.time(),
                    "domain": domain,
                    "address": address.lower(),
                    "prefix": prefix,
                    "suffix": suffix,
                },
            )
            return cursor.rowcount

        return await self._write(work)

    async def flush_queue(self, now: float, domain: str | None = None) -> int:
        # In id slices like defer_destination: a million deferred rows never hold the single
        # writer (and every intake commit behind it) for seconds.
        where = "domain = :domain AND " if domain is not None else ""
        params: dict[str, Any] = {
            "domain": None if domain is None else domain.lower(),
            "now": now,
            "slice": DEFER_SLICE,
        }

        def work(conn: sqlite3.Connection, after: int) -> tuple[int, int | None]:
            (upto,) = conn.execute(
                "SELECT max(id) FROM (SELECT id FROM recipients WHERE "
                f"{where}state = 'pending' AND id > :after ORDER BY id LIMIT :slice)",
                {**params, "after": after},
            ).fetchone()
            if upto is None:
                return 0, None
            cursor = conn.execute(
                "UPDATE recipients SET next_attempt_at = :now, updated_at = :now"
                f" WHERE {where}state = 'pending' AND id > :after AND id <= :upto"
                " AND held = 0 AND next_attempt_at > :now AND (released = 1 OR EXISTS"
                " (SELECT 1 FROM domains d WHERE d.name = recipients.domain"
                " AND d.mode = 'relay'))",
                {**params, "after": after, "upto": upto},
            )
            return cursor.rowcount, int(upto)

        # The flush is recorded before any row is due: an engine that finds them due also
        # finds the flush, and forgets the destination's dead state (delivery/scheduler.py).
        await self._write(functools.partial(_record_flush, domain=params["domain"]))
        changed = 0
        after: int | None = 0
        while after is not None:
            count, after = await self._write(functools.partial(work, after=after))
            changed += count
        return changed

    async def record_recipient_checks(self, domain: str, checks: Sequence[RecipientCheck]) -> None:
        name = domain.lower()

        def work(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone() is None:
                raise NotFound(f"no domain {domain}; 'mxspool domain list' shows the domains")
            conn.execute("DELETE FROM recipient_checks WHERE domain = ?", (name,))
            conn.executemany(
                "INSERT INTO recipient_checks (domain, address, state, reply, checked_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (domain, address) DO UPDATE SET"
                " state = excluded.state, reply = excluded.reply, checked_at = excluded.checked_at",
                [
                    (name, item.address.lower(), item.state, item.reply, item.checked_at)
                    for item in checks
                ],
            )

        await self._write(work)

    # -- queue --------------------------------------------------------------------------
    async def read_body(self, message_id: str) -> AsyncIterator[bytes]:
        def locate(conn: sqlite3.Connection) -> tuple[int, str, bool] | None:
            row = conn.execute(
                "SELECT seq, tags, EXISTS (SELECT 1 FROM bodies b WHERE b.seq = m.seq) "
                "FROM messages m WHERE id = ?",
                (message_id,),
            ).fetchone()
            return None if row is None else (int(row[0]), row[1], bool(row[2]))

        located = await self._read(locate)
        if located is None:
            raise NotFound(f"no message {message_id}; 'mxspool queue list' shows the queue")
        seq, tags, has_body = located
        if not has_body:
            raise purge.body_gone(message_id, tags)
        offset = 0
        while True:

            def piece(conn: sqlite3.Connection, start: int = offset) -> bytes:
                with conn.blobopen("bodies", "data", seq, readonly=True) as blob:
                    blob.seek(start)
                    return blob.read(BLOB_CHUNK)

            data = await self._read(piece)
            if not data:
                return
            offset += len(data)
            yield data

    async def _set_final(self, message_id: str, state: str, reply: str | None) -> int:
        def work(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT seq FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                raise NotFound(f"no message {message_id}; 'mxspool queue list' shows the queue")
            cursor = conn.execute(
                "UPDATE recipients SET state = ?, last_reply = coalesce(?, last_reply), "
                "lease_owner = NULL, lease_until = NULL, updated_at = ? "
                "WHERE message_seq = ? AND state IN ('pending', 'delivering', 'parked')",
                (state, reply, time.time(), row[0]),
            )
            return cursor.rowcount

        return await self._write(work)

    async def discard(self, message_id: str) -> int:
        return await self._set_final(message_id, "discarded", None)

    async def mark_bounced(self, message_id: str, reply: str) -> int:
        return await self._set_final(message_id, "bounced", reply)

    async def retry(self, message_id: str | None = None, domain: str | None = None) -> int:
        def work(conn: sqlite3.Connection) -> int:
            where = ["state = 'parked'"]
            values: list[Any] = [time.time()]
            if message_id is not None:
                row = conn.execute(
                    "SELECT seq FROM messages WHERE id = ?", (message_id,)
                ).fetchone()
                if row is None:
                    raise NotFound(f"no message {message_id}; 'mxspool queue list' shows the queue")
                where.append("message_seq = ?")
                values.append(row[0])
            if domain is not None:
                where.append("domain = ?")
                values.append(domain.lower())
            cursor = conn.execute(
                "UPDATE recipients SET state = 'pending', next_attempt_at = 0, updated_at = ? "
                f"WHERE {' AND '.join(where)}",
                values,
            )
            return cursor.rowcount

        return await self._write(work)

    async def status(self, now: float) -> list[DomainStatus]:
        def work(conn: sqlite3.Connection) -> list[DomainStatus]:
            # O(domains): the counters (kept by triggers, migration 0006), then one index
            # probe per domain for its oldest unfinished row and one index range for the
            # last minute's deliveries.
            modes = {
                name: DomainMode(mode)
                for name, mode in conn.execute("SELECT name, mode FROM domains")
            }
            rows: list[counts.CountRow] = conn.execute(
                "SELECT domain, state, released, n FROM recipient_counts WHERE n <> 0"
            ).fetchall()
            oldest = {}
            for name in counts.unfinished_domains(rows):
                (first,) = conn.execute(_OLDEST_SQL, (name, counts.OLDEST_WINDOW)).fetchone()
                if first is not None:
                    oldest[name] = first
            recent = {
                name: conn.execute(_RECENT_SQL, (name, now - 60.0)).fetchone()[0]
                for name in counts.delivered_domains(rows)
            }
            return counts.statuses(modes, rows, oldest, recent, now)

        return await self._read(work)

    async def check_counters(self, repair: bool = False) -> list[CounterDrift]:
        def compare(conn: sqlite3.Connection) -> list[CounterDrift]:
            # One read transaction: the counters and the rows from the same snapshot.
            stored = conn.execute("SELECT domain, state, released, n FROM recipient_counts")
            return counts.drift(stored.fetchall(), conn.execute(counts.RECOUNT_SQL).fetchall())

        def fix(conn: sqlite3.Connection) -> list[CounterDrift]:
            found = compare(conn)
            if found:
                conn.execute("DELETE FROM recipient_counts")
                conn.execute(
                    "INSERT INTO recipient_counts (domain, state, released, n) "
                    + counts.RECOUNT_SQL
                )
            return found

        return await (self._write(fix) if repair else self._read(compare))

    async def purge_delivered(self, before: float, dry_run: bool = False) -> PurgeResult:
        found_sql = purge.candidates_sql("?", "instr")
        recheck = (
            "SELECT m.seq, m.size FROM messages m WHERE m.seq IN (SELECT value FROM json_each(?))"
            f" AND {purge.condition('?', 'instr')}"
        )
        tag = purge.tag_for(time.time())

        async def last_seq() -> int:
            rows = await self._fetch("SELECT coalesce(max(seq), 0) FROM messages", ())
            return int(rows[0][0])

        async def find(after: int, upto: int) -> purge.Found:
            rows = await self._fetch(found_sql, (after, upto, before, purge.BATCH))
            return [(int(seq), int(size)) for seq, size in rows]

        def drop(conn: sqlite3.Connection, seqs: list[int]) -> purge.Found:
            found = conn.execute(recheck, (json.dumps(seqs), before)).fetchall()
            chosen = json.dumps([row[0] for row in found])
            conn.execute(
                "DELETE FROM bodies WHERE seq IN (SELECT value FROM json_each(?))", (chosen,)
            )
            conn.execute(
                "UPDATE messages SET tags = CASE WHEN tags = '' THEN ? ELSE tags || ',' || ? END"
                " WHERE seq IN (SELECT value FROM json_each(?))",
                (tag, tag, chosen),
            )
            return [(int(seq), int(size)) for seq, size in found]

        async def write(seqs: list[int]) -> purge.Found:
            return await self._write(functools.partial(drop, seqs=seqs))

        return await purge.run(last_seq, find, write, cutoff=before, dry_run=dry_run)

    # -- audit --------------------------------------------------------------------------
    async def record_audit(self, actor: str, action: str, target: str, detail: str = "") -> None:
        actor = audit_actor(actor)  # "cli" becomes the OS user in a CLI process

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO audit (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
                (time.time(), actor, action, target, detail),
            )

        await self._write(work)

    # -- migration toolkit ----------------------------------------------------------------
    async def add_recipients(
        self,
        domain: str,
        addresses: Sequence[str],
        replace: bool = False,
        max_sizes: Mapping[str, int] | None = None,
    ) -> int:
        name = ascii_lower(domain)
        sizes = max_sizes or {}
        rows = [
            (name, key, sizes.get(address))
            for address in addresses
            if (key := address_key(address)) is not None
        ]

        def work(conn: sqlite3.Connection) -> int:
            if conn.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone() is None:
                raise NotFound(f"no domain {domain}; 'mxspool domain list' shows the domains")
            if replace:
                conn.execute("DELETE FROM recipient_lists WHERE domain = ?", (name,))
            conn.executemany(
                "INSERT INTO recipient_lists (domain, address, max_size) VALUES (?, ?, ?) "
                "ON CONFLICT (domain, address) DO UPDATE SET max_size = excluded.max_size",
                rows,
            )
            _bump_generation(conn)
            count = conn.execute(
                "SELECT count(*) FROM recipient_lists WHERE domain = ?", (name,)
            ).fetchone()[0]
            return int(count)

        return await self._write(work)

    async def clear_recipients(self, domain: str) -> int:
        def work(conn: sqlite3.Connection) -> int:
            cursor = conn.execute("DELETE FROM recipient_lists WHERE domain = ?", (domain.lower(),))
            _bump_generation(conn)
            return cursor.rowcount

        return await self._write(work)

    async def add_tag(self, message_id: str, tag: str) -> None:
        def work(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT tags FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                raise NotFound(f"no message {message_id}; 'mxspool queue list' shows the queue")
            tags = [item for item in row[0].split(",") if item]
            if tag not in tags:
                tags.append(tag)
                conn.execute(
                    "UPDATE messages SET tags = ? WHERE id = ?", (",".join(tags), message_id)
                )

        await self._write(work)

    async def set_authentication(
        self, message_id: str, auth_results: str, tags: Sequence[str]
    ) -> None:
        if await self.set_authentications([(message_id, auth_results, tags)]):
            raise NotFound(f"no message {message_id}; 'mxspool queue list' shows the queue")

    async def set_authentications(
        self, verdicts: Sequence[tuple[str, str, Sequence[str]]]
    ) -> list[str]:
        items = [(mid, value, list(tags)) for mid, value, tags in verdicts]
        now = time.time()

        def work(conn: sqlite3.Connection) -> list[str]:
            missing = []
            updates = []
            for message_id, value, tags in items:
                row = conn.execute(
                    "SELECT tags FROM messages WHERE id = ?", (message_id,)
                ).fetchone()
                if row is None:
                    missing.append(message_id)
                    continue
                updates.append((value, now, codec.merge_tags(row[0], tags), message_id))
            conn.executemany(
                "UPDATE messages SET auth_results = ?, auth_at = ?, tags = ? WHERE id = ?",
                updates,
            )
            return missing

        return await self._write(work)

    async def mark_unjudged(
        self, node: str, message_ids: Sequence[str] = (), *, move: bool = False
    ) -> None:
        sql, params = queries.unjudged_sql(self.dialect, node, message_ids, move=move)
        await self._write(lambda conn: conn.execute(sql, params))

    async def clear_unjudged(self, node: str) -> None:
        sql, params = queries.clear_unjudged_sql(self.dialect, node)
        await self._write(lambda conn: conn.execute(sql, params))

    async def adopt_unjudged(self, node: str) -> list[str]:
        # The serve lock makes this the spool's one server: every other name is not running.
        sql, params = queries.other_marks_sql(self.dialect, node)

        def work(conn: sqlite3.Connection) -> list[str]:
            others = [str(row[0]) for row in conn.execute(sql, params)]
            for other in others:
                for statement, values in queries.adopt_mark_sql(self.dialect, node, other):
                    conn.execute(statement, values)
            return others

        return await self._write(work)

    # -- delivery -----------------------------------------------------------------------
    async def due_domains(self, now: float) -> list[str]:
        # Per domain, index probes that stop at the first row found, so a held backlog or a
        # deferred one costs nothing here however large it is.
        def work(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT d.name FROM domains d WHERE"
                " (d.mode = 'relay' AND EXISTS (SELECT 1 FROM recipients r"
                "   WHERE r.domain = d.name AND r.state = 'pending' AND r.next_attempt_at <= ?))"
                " OR EXISTS (SELECT 1 FROM recipients r INDEXED BY recipients_canary"
                "   WHERE r.domain = d.name AND r.released = 1"
                "   AND r.state IN ('pending', 'delivering') AND r.state = 'pending'"
                "   AND r.next_attempt_at <= ?)"
                " OR EXISTS (SELECT 1 FROM recipients r WHERE r.domain = d.name"
                "   AND r.state = 'delivering' AND r.lease_until < ?)"
                " ORDER BY d.name",
                (now, now, now),
            )
            return [row[0] for row in rows]

        return await self._read(work)

    async def next_due_at(self, domain: str) -> float | None:
        def work(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                # Each an index probe that stops at its first row (min() over a correlated
                # subquery walked the domain's whole backlog).
                "SELECT min(coalesce(("
                "  SELECT r.next_attempt_at FROM recipients r INDEXED BY recipients_due"
                "  WHERE d.mode = 'relay' AND r.domain = d.name AND r.state = 'pending'"
                "  ORDER BY r.next_attempt_at LIMIT 1), 1e300),"
                " coalesce((SELECT r.next_attempt_at FROM recipients r"
                "  INDEXED BY recipients_canary WHERE r.domain = d.name AND r.released = 1"
                "  AND r.state IN ('pending', 'delivering') AND r.state = 'pending'"
                "  ORDER BY r.next_attempt_at LIMIT 1), 1e300),"
                " coalesce((SELECT r.lease_until FROM recipients r INDEXED BY recipients_lease"
                "  WHERE r.domain = d.name AND r.state = 'delivering'"
                "  ORDER BY r.lease_until LIMIT 1), 1e300))"
                " FROM domains d WHERE d.name = ?",
                (domain.lower(),),
            ).fetchone()
            if row is None or row[0] is None or row[0] >= 1e300:
                return None
            return float(row[0])

        return await self._read(work)

    async def defer_destination(self, domain: str, deferral: DestinationDeferral) -> int:
        # One UPDATE, run over the domain's open rows in id slices (the recipients_open
        # index), each slice its own write: a million-row queue never holds the single
        # writer (and with it every intake commit) for seconds. No row is read into Python.
        # A slice is a consistent unit; between slices only claims can run, and a row a
        # claim takes is simply left to it, as in one statement.
        params = {**codec.deferral_params(domain, deferral), "slice": DEFER_SLICE}

        def work(conn: sqlite3.Connection, after: int) -> tuple[int, int | None]:
            (upto,) = conn.execute(
                "SELECT max(id) FROM (SELECT id FROM recipients WHERE domain = :domain"
                " AND state IN ('pending', 'delivering') AND id > :after"
                " ORDER BY id LIMIT :slice)",
                {**params, "after": after},
            ).fetchone()
            if upto is None:
                return 0, None
            cursor = conn.execute(
                "UPDATE recipients SET"
                " state = CASE WHEN m.received_at <= :cutoff THEN 'parked' ELSE 'pending' END,"
                " last_reply = CASE WHEN m.received_at <= :cutoff THEN :expired ELSE :reply END,"
                " next_attempt_at = :until, lease_owner = NULL, lease_until = NULL,"
                " updated_at = :now"
                " FROM domains d, messages m"
                " WHERE recipients.domain = :domain AND recipients.id > :after"
                " AND recipients.id <= :upto AND recipients.state IN ('pending', 'delivering')"
                " AND d.name = :domain AND (d.mode = 'relay' OR recipients.released = 1)"
                " AND recipients.held = 0"
                " AND m.seq = recipients.message_seq"
                " AND ((recipients.state = 'pending'"
                "   AND (recipients.next_attempt_at <> :until OR m.received_at <= :cutoff))"
                "  OR (recipients.state = 'delivering' AND recipients.lease_until < :now))",
                {**params, "after": after, "upto": upto},
            )
            return cursor.rowcount, int(upto)

        changed = 0
        after: int | None = 0
        while after is not None:
            count, after = await self._write(functools.partial(work, after=after))
            changed += count
        return changed

    async def claim_due(
        self, owner: str, now: float, lease_seconds: float, limit: int, domain: str
    ) -> list[DeliveryJob]:
        def work(conn: sqlite3.Connection) -> list[DeliveryJob]:
            mode_row = conn.execute(
                "SELECT mode FROM domains WHERE name = ?", (domain.lower(),)
            ).fetchone()
            if mode_row is None:
                return []
            canary_only = "" if mode_row[0] == "relay" else "AND r.released = 1"
            if mode_row[0] != "relay":
                # A dead worker's claims in a domain put back on hold are held again, not sent.
                conn.execute(
                    "UPDATE recipients SET state = 'pending', lease_owner = NULL, "
                    "lease_until = NULL, updated_at = ? WHERE domain = ? AND state = "
                    "'delivering' AND lease_until < ? AND released = 0",
                    (now, domain.lower(), now),
                )
            # r.held: kept by a recipient hold (hold --recipient), whatever the domain's mode.
            due = (
                "r.state IN ('pending', 'delivering') AND ((r.state = 'pending' AND "
                f"r.next_attempt_at <= :now AND r.held = 0 {canary_only}) OR "
                "(r.state = 'delivering' AND r.lease_until < :now))"
            )
            params = {"domain": domain.lower(), "now": now, "limit": limit}
            # Whole messages (one transaction each at the next hop): the first ``limit`` due
            # rows choose the messages (``_CLAIM_CHOICE_*``), then every due row of those
            # messages in this domain is claimed, found through recipients_message (a few rows
            # each, never a scan of the domain's or the state's index, which hold the whole
            # backlog).
            choice = _CLAIM_CHOICE_RELAY if mode_row[0] == "relay" else _CLAIM_CHOICE_HELD
            seqs = [row[0] for row in conn.execute(choice, params)]
            if not seqs:
                return []
            ids = [
                row[0]
                for row in conn.execute(
                    "UPDATE recipients AS r INDEXED BY recipients_message SET "
                    "state = 'delivering', lease_owner = :owner, lease_until = :until, "
                    "updated_at = :now WHERE r.message_seq IN (SELECT value FROM "
                    f"json_each(:seqs)) AND r.domain = :domain AND {due} RETURNING id",
                    {
                        **params,
                        "owner": owner,
                        "until": now + lease_seconds,
                        "seqs": json.dumps(seqs),
                    },
                )
            ]
            rows = conn.execute(
                f"SELECT {queries.CLAIMED_COLUMNS} FROM recipients r "
                "JOIN messages m ON m.seq = r.message_seq "
                "WHERE r.id IN (SELECT value FROM json_each(?))",
                (json.dumps(ids),),
            ).fetchall()
            return queries.delivery_jobs(rows, domain.lower())

        return await self._write(work)

    async def release_claims(self, owner: str, recipient_ids: Sequence[int]) -> None:
        ids = list(recipient_ids)
        if not ids:
            return

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE recipients SET state = 'pending', next_attempt_at = 0, lease_owner = NULL,"
                f" lease_until = NULL WHERE lease_owner = ? AND state = 'delivering' AND id IN "
                f"({','.join('?' * len(ids))})",
                (owner, *ids),
            )

        await self._write(work)

    async def renew_leases(self, owner: str, recipient_ids: Sequence[int], until: float) -> None:
        ids = list(recipient_ids)
        if not ids:
            return

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"UPDATE recipients SET lease_until = ? WHERE lease_owner = ? AND state = "
                f"'delivering' AND id IN ({','.join('?' * len(ids))})",
                (until, owner, *ids),
            )

        await self._write(work)

    async def record_outcomes(self, owner: str, outcomes: Sequence[RecipientOutcome]) -> None:
        items = list(outcomes)
        if not items:
            return

        def work(conn: sqlite3.Connection) -> None:
            now = time.time()
            for item in items:
                cursor = conn.execute(
                    "UPDATE recipients SET state = ?, last_reply = ?, attempts = attempts + ?, "
                    "next_attempt_at = ?, delivered_at = ?, sent_sha256 = ?, lease_owner = NULL, "
                    "lease_until = NULL, updated_at = ? "
                    "WHERE id = ? AND state = 'delivering' AND lease_owner = ?",
                    (
                        item.state.value,
                        item.reply,
                        int(item.count_attempt),
                        item.next_attempt_at,
                        now if item.state is RecipientState.DELIVERED else None,
                        item.sent_sha256,
                        now,
                        item.recipient_id,
                        owner,
                    ),
                )
                if cursor.rowcount and item.count_attempt:
                    conn.execute(
                        "INSERT INTO attempts (recipient_id, at, destination, outcome, reply) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (item.recipient_id, now, item.destination, item.state.value, item.reply),
                    )

        await self._write(work)

    # -- wake-ups and pacing --------------------------------------------------------------
    async def notifications(self) -> AsyncIterator[str]:
        """One node, one process: nothing to hear from others; polling does the rest."""
        yield "resync"
        await asyncio.Event().wait()

    async def take_tokens(
        self, bucket: str, rate: float, burst: float, want: int, now: float
    ) -> int:
        if want <= 0:
            return 0
        burst = max(burst, 1.0)

        def work(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT tokens, updated_at FROM rate_buckets WHERE bucket = ?", (bucket,)
            ).fetchone()
            if row is None:
                available, stamp = burst, now
            else:
                available = min(burst, row[0] + rate * max(0.0, now - row[1]))
                stamp = max(row[1], now)
            granted = int(max(0.0, min(float(want), available)))
            conn.execute(
                "INSERT INTO rate_buckets (bucket, tokens, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (bucket) DO UPDATE SET tokens = excluded.tokens, "
                "updated_at = excluded.updated_at",
                (bucket, available - granted, stamp),
            )
            return granted

        return await self._write(work)

    async def acquire_slot(self, destination: str, owner: str, limit: int, ttl: float) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            now = time.time()
            conn.execute(
                "DELETE FROM delivery_slots WHERE destination = ? AND expires_at < ?",
                (destination, now),
            )
            others = conn.execute(
                "SELECT count(*) FROM delivery_slots WHERE destination = ? AND owner <> ?",
                (destination, owner),
            ).fetchone()[0]
            if others >= limit:
                return False
            conn.execute(
                "INSERT INTO delivery_slots (destination, owner, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (destination, owner) DO UPDATE SET expires_at = excluded.expires_at",
                (destination, owner, now + ttl),
            )
            return True

        return await self._write(work)

    async def release_slot(self, destination: str, owner: str) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM delivery_slots WHERE destination = ? AND owner = ?",
                (destination, owner),
            )

        await self._write(work)

    # -- migrations (issue 12) ----------------------------------------------------------
    async def add_migration(self, migration: Migration) -> None:
        def work(conn: sqlite3.Connection) -> None:
            now = time.time()
            try:
                conn.execute(*queries.migration_insert(self.dialect, migration, now))
            except sqlite3.IntegrityError:
                raise Conflict(queries.migration_exists(migration.name)) from None
            _add_members(conn, migration.name, migration.domains, now)
            _bump_generation(conn)

        await self._write(work)

    async def change_migration_domains(
        self, name: str, add: Sequence[str] = (), remove: Sequence[str] = ()
    ) -> Migration:
        def work(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM migrations WHERE name = ?", (name,)).fetchone() is None:
                raise NotFound(queries.no_migration(name))
            for domain in remove:
                cursor = conn.execute(
                    "DELETE FROM migration_domains WHERE migration = ? AND domain = ?",
                    (name, domain.lower()),
                )
                if cursor.rowcount == 0:
                    raise NotFound(queries.not_in_migration(domain, name))
            _add_members(conn, name, add, time.time())
            _bump_generation(conn)

        await self._write(work)
        return await self._require_migration(name)

    async def update_migration(self, name: str, changes: MigrationChanges) -> Migration:
        def work(conn: sqlite3.Connection) -> None:
            _update_migration_row(conn, name, changes)

        await self._write(work)
        return await self._require_migration(name)

    async def remove_migration(self, name: str) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM migration_domains WHERE migration = ?", (name,))
            if conn.execute("DELETE FROM migrations WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(queries.no_migration(name))
            _bump_generation(conn)

        await self._write(work)

    async def apply_transition(self, transition: DomainsTransition) -> list[Domain]:
        audit = transition.audit
        actor = audit_actor(audit.actor) if audit is not None else ""
        events = queries.event_rows(transition.events)

        def work(conn: sqlite3.Connection) -> list[Domain]:
            name = transition.migration
            if transition.expect_release_at is not None:
                row = conn.execute(
                    "SELECT release_at FROM migrations WHERE name = ?", (name,)
                ).fetchone()
                if row is None or row[0] != transition.expect_release_at:
                    raise Conflict(f"the scheduled release of {name} was changed or done")
            updated = [
                _update_domain_row(conn, domain, changes)
                for domain, changes in transition.changes.items()
            ]
            if name is not None and transition.migration_changes is not None:
                _update_migration_row(conn, name, transition.migration_changes)
            _insert_events(conn, events)
            if audit is not None:
                conn.execute(
                    "INSERT INTO audit (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
                    (audit.at, actor, audit.action, audit.target, audit.detail),
                )
            return updated

        return await self._write(work)

    async def record_stage_events(self, events: Sequence[StageEvent]) -> None:
        rows = queries.event_rows(events)

        def work(conn: sqlite3.Connection) -> None:
            _insert_events(conn, rows)

        if rows:
            await self._write(work)


_OLDEST_SQL = (
    "SELECT min(m.received_at) FROM (SELECT message_seq FROM recipients"
    " WHERE domain = ? AND state IN ('pending', 'delivering') ORDER BY id LIMIT ?) r"
    " JOIN messages m ON m.seq = r.message_seq"
)
"""The oldest unfinished row of a domain: a probe of the recipients_open index."""
_RECENT_SQL = (
    "SELECT count(*) FROM recipients WHERE domain = ? AND state = 'delivered' AND delivered_at >= ?"
)
"""Deliveries of a domain since a time: a range of the recipients_delivered index."""


def _update_domain_row(conn: sqlite3.Connection, name: str, changes: DomainChanges) -> Domain:
    """Change one domain (a statement of the caller's transaction); NotFound when absent."""
    sets: list[str] = []
    values: list[Any] = []
    if changes.mode is not None:
        sets.append("mode = ?")
        values.append(changes.mode.value)
    if changes.routes is not None:
        sets.append("routes = ?")
        values.append(codec.dump_routes(changes.routes))
    if changes.use_mx is not None:
        sets.append("use_mx = ?")
        values.append(int(changes.use_mx))
    if changes.tls is not None:
        sets.append("tls = ?")
        values.append(changes.tls.value)
    if changes.rate is not None or changes.clear_rate:
        sets.append("rate = ?")
        values.append(changes.rate)
    if changes.profile is not None:
        sets.append("profile = ?")
        values.append(changes.profile or None)
    if changes.released_at is not None:
        sets.append("released_at = ?")
        values.append(changes.released_at)
    if changes.max_size is not None or changes.clear_max_size:
        sets.append("max_size = ?")
        values.append(changes.max_size)
    if changes.subdomains is not None:
        sets.append("subdomains = ?")
        values.append(int(changes.subdomains))
    if changes.plus_separator is not None:
        sets.append("plus_separator = ?")
        values.append(changes.plus_separator)
    sets.append("updated_at = ?")
    values.append(time.time())
    cursor = conn.execute(
        f"UPDATE domains SET {', '.join(sets)} WHERE name = ?", (*values, name.lower())
    )
    if cursor.rowcount == 0:
        raise NotFound(f"no domain {name}; 'mxspool domain list' shows the domains")
    _bump_generation(conn)
    row = conn.execute(
        f"SELECT {codec.DOMAIN_COLUMNS} FROM domains WHERE name = ?", (name.lower(),)
    ).fetchone()
    return codec.domain_from_row(row)


def _add_members(
    conn: sqlite3.Connection, migration: str, domains: Sequence[str], now: float
) -> None:
    for domain in domains:
        name = domain.lower()
        if conn.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone() is None:
            raise NotFound(f"no domain {domain}; add it first with 'mxspool domain add {domain}'")
        other = conn.execute(
            "SELECT migration FROM migration_domains WHERE domain = ?", (name,)
        ).fetchone()
        if other is not None:
            if other[0] == migration:
                continue
            raise Conflict(queries.taken(name, other[0]))
        conn.execute(
            "INSERT INTO migration_domains (migration, domain, added_at) VALUES (?, ?, ?)",
            (migration, name, now),
        )


def _update_migration_row(conn: sqlite3.Connection, name: str, changes: MigrationChanges) -> None:
    sets = [*queries.migration_sets(changes), ("updated_at", time.time())]
    cursor = conn.execute(
        f"UPDATE migrations SET {', '.join(f'{column} = ?' for column, _ in sets)} WHERE name = ?",
        (*(value for _, value in sets), name),
    )
    if cursor.rowcount == 0:
        raise NotFound(queries.no_migration(name))
    _bump_generation(conn)


def _insert_events(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    conn.executemany(
        "INSERT INTO stage_events (domain, stage, at, actor, detail, migration) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        rows,
    )


def _record_flush(conn: sqlite3.Connection, domain: str | None) -> None:
    (generation,) = conn.execute(
        "INSERT INTO meta (key, value) VALUES ('flush_generation', 1) ON CONFLICT (key)"
        " DO UPDATE SET value = meta.value + 1 RETURNING value"
    ).fetchone()
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key)"
        " DO UPDATE SET value = excluded.value",
        (f"flush:{domain or FLUSH_ALL}", generation),
    )


def _bump_generation(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'domains_generation'")


def _settle(results: list[tuple[_Job, Any, BaseException | None]]) -> None:
    for job, value, outcome in results:
        if job.on_done is not None and job.loop is not None:
            try:
                job.loop.call_soon_threadsafe(job.on_done, outcome)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass
            continue
        if job.future.done():  # the caller gave up (cancelled) while we worked
            continue
        if outcome is not None:
            job.future.set_exception(outcome)
        else:
            job.future.set_result(value)


_ACCEPT_COLUMNS = (*codec.MESSAGE_COLUMNS, "data", "recipients")
_ACCEPT_INSERT = f"INSERT INTO accept_rows ({', '.join(_ACCEPT_COLUMNS)}) VALUES "
_ACCEPT_MARKS = "(" + ", ".join("?" * len(_ACCEPT_COLUMNS)) + ")"
_COMMIT_ONE = _ACCEPT_INSERT + (
    "("
    + ", ".join(
        f"mxspool_sha256(?{_ACCEPT_COLUMNS.index('data') + 1})" if column == "sha256" else f"?{n}"
        for n, column in enumerate(_ACCEPT_COLUMNS, 1)
    )
    + ")"
)
"""The commit thread's INSERT: as ``_ACCEPT_MARKS``, but the sha256 column is computed from the
body by the thread itself (``mxspool_sha256``, _groupcommit.c), not on the event loop; the
value bound in its place (None, ``_accept_row(..., digest=False)``) is not used."""


def _accept_row(message: IncomingMessage, *, digest: bool = True) -> tuple[Any, ...]:
    """The accept_rows values of a message whose body is in memory (see 0005_accept_rows.sql);
    without ``digest``, None for its sha256 (``_COMMIT_ONE``)."""
    return (
        *codec.message_row(message, digest=digest).values(),
        message.body.getvalue(),
        json.dumps(codec.accept_recipients(message)),
    )


def _settle_future(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the caller gave up (cancelled); the commit stands
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _insert_accept_rows(conn: sqlite3.Connection, messages: list[IncomingMessage]) -> None:
    """Insert messages whose bodies are in memory: one statement, its own transaction.

    The connection must be in autocommit mode with no transaction open: SQLite then commits
    (and, with synchronous=FULL, fsyncs) when the statement ends, and a failure leaves nothing.
    """
    rows = [_accept_row(message) for message in messages]
    conn.execute(
        _ACCEPT_INSERT + ", ".join([_ACCEPT_MARKS] * len(rows)),
        [value for row in rows for value in row],
    )


def _insert_message(conn: sqlite3.Connection, message: IncomingMessage) -> None:
    """One accepted message in the open transaction: for spilled bodies, and for retries one by
    one after a batch of accepts failed."""
    columns = codec.MESSAGE_COLUMNS
    cursor = conn.execute(
        f"INSERT INTO messages ({', '.join(columns)}) VALUES (:{', :'.join(columns)})",
        codec.message_row(message),
    )
    seq = cursor.lastrowid
    assert seq is not None
    body = message.body
    in_memory = body.getvalue()
    if in_memory is not None:
        conn.execute("INSERT INTO bodies (seq, data) VALUES (?, ?)", (seq, in_memory))
    else:
        # Large bodies are copied piece by piece so the writer never holds one whole.
        conn.execute("INSERT INTO bodies (seq, data) VALUES (?, zeroblob(?))", (seq, body.size))
        with conn.blobopen("bodies", "data", seq) as blob:
            for piece in body.chunks(BLOB_CHUNK):
                blob.write(piece)
    conn.executemany(
        "INSERT INTO recipients (message_seq, rcpt, domain, params, state, last_reply, "
        "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (
                seq,
                *row[:3],
                row[3] if len(row) > 3 else "pending",
                row[4] if len(row) > 4 else None,
                message.received_at,
            )
            for row in codec.accept_recipients(message)
        ],
    )
