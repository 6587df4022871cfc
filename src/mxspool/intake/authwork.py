"""The verification worker process of authentication at arrival: the CPU-heavy part, off the
intake's GIL.

Why a process: DKIM verification is mostly pure Python in dkimpy (parsing the message,
canonicalizing header and body; ~0.5 ms of CPU for a 10 KiB message). In a thread of the
intake it competes for the GIL with the event loop that accepts mail, and halved the accept
rate under load. In a worker process it uses another core, or (the worker runs under Linux's
SCHED_IDLE policy, ``lower_priority``) only the time the intake leaves idle: a burst of mail
wins the CPU and the verdicts catch up right after.

What a worker is given (``Job``): on a SQLite store, only the message's id and the store's
path: the worker reads the committed bytes itself (``read_stored``: its own read-only
connection, one per worker), so no message byte passes through the intake's event loop, its
pickling threads or a pipe (that cost the intake ~0.1 ms a 10 KiB message, ~0.3 ms a 100 KiB
one), and the worker resolves the names itself (its cache below). Otherwise (PostgreSQL): the
message bytes, or for a spilled body the path of the intake's open spill file
(``/proc/<pid>/fd/<n>``: the file is unlinked; the intake keeps it open until the job is
done), with the records of the names the message needs (resolved by the intake, which shares
one cache for every message: ``authcheck.names_needed``). And a DNS budget. It returns the
DKIM results and the DMARC record (``authcheck.DmarcPolicy``); the intake adds SPF's result
and aligns (``authcheck.dmarc_verdict``), which takes microseconds.

DNS in the worker: for a name it was not given (every name of a message read from the store;
a signature the intake's quick parse read differently), through its own resolver and cache
(``intake.authdns``, set up by ``initialize`` from the same ``[delivery] resolver``), within
the job's budget. A worker never outlives the intake: a thread watches the intake's pid and
exits when it is gone (then the forkserver, which lives while a worker does, ends too).

Everything here runs in the worker; nothing here touches the store or the event loop.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any

from mxspool.intake import authcheck, authdns
from mxspool.intake.authcheck import DkimResult, DmarcPolicy

NICE = 5
"""Niceness steps a worker adds to its own (os.nice); it matters only where SCHED_IDLE is
refused (then ``FALLBACK_NICE`` is used instead)."""
FALLBACK_NICE = 19
"""Niceness of a worker that may not use SCHED_IDLE."""
PARENT_CHECK = 1.0
"""Seconds between a worker's checks that the intake (whose pid it was given) is still there."""

_settings: dict[str, str] = {"nameserver": ""}

Records = dict[str, "list[bytes] | str"]
"""Prefetched TXT records by ``authcheck.dns_key``: the records, or the DNS error's text."""


@dataclass(slots=True)  # not frozen: a frozen one costs ~8 us to make, more to pickle
class Job:
    """One message to verify. ``data`` is its bytes (for a large one only the start, with
    ``size`` the whole size), or ``path`` a file holding them, or (both None) the stored
    message ``message_id`` of the SQLite store at ``database``."""

    data: bytes | None
    path: str | None
    size: int
    records: Records
    budget: float
    message_id: str = ""
    database: str = ""


@dataclass(slots=True)
class Outcome:
    dkim: tuple[DkimResult, ...]
    dmarc: DmarcPolicy
    pid: int
    cpu: float


def initialize(nameserver: str, nice: int, owner: int) -> None:
    """The worker's initializer: DNS settings, the watch on ``owner`` (the intake's pid), and
    its scheduling (``lower_priority``), which the worker's first job applies: the start of a
    worker (``ready``, which serve waits for) must not wait for an idle CPU."""
    _settings["nameserver"] = nameserver
    _priority[:] = [nice]
    threading.Thread(target=_watch_owner, args=(owner,), daemon=True).start()


_priority: list[int] = []
"""The ``nice`` that ``_lowered`` applies, until it has (then empty)."""


def _lowered() -> None:
    if _priority:
        lower_priority(_priority.pop())


def lower_priority(nice: int) -> str:
    """Run this process only on CPU time the intake does not want: SCHED_IDLE (Linux), plus
    ``nice`` steps; where SCHED_IDLE is refused or missing, nice +``FALLBACK_NICE``. Returns
    what was applied: "idle", "nice" or "" (nothing permitted)."""
    policy = ""
    idle = getattr(os, "SCHED_IDLE", None)
    if idle is not None and nice:
        try:
            os.sched_setscheduler(0, idle, os.sched_param(0))
            policy = "idle"
        except (OSError, AttributeError):
            pass
    steps = nice if policy or not nice else max(nice, FALLBACK_NICE)
    if steps:
        try:
            os.nice(steps)
            policy = policy or "nice"
        except OSError:
            pass
    return policy


def _watch_owner(owner: int) -> None:
    """Exit once the intake is gone. Its pid, not the parent's: the parent is the forkserver,
    which lives as long as any worker holds its "alive" pipe, so a worker that watched it would
    keep both alive for ever after a kill -9 of the intake."""
    while True:
        time.sleep(PARENT_CHECK)
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:
            pass  # a process of another user took the pid? it exists: keep going


def verify(job: Job) -> Outcome:
    """DKIM results and the DMARC record of one message (blocking; in a worker process)."""
    started = time.process_time()
    data: bytes | None = job.data
    if data is None and job.path:
        data = _read(job.path)
    elif data is None:
        try:
            data = read_stored(job.database, job.message_id)
        except Exception as exc:  # sqlite3.Error, psycopg.Error: the store, not the message
            _forget(job.database)
            return _unreadable(f"store not readable: {exc}", started)
        if data is None:  # gone (deleted) before its check: no verdict to store anyway
            return _unreadable("message gone", started)
    deadline = time.monotonic() + job.budget
    lookup = _lookup(job.records, deadline)
    dkim = authcheck.check_dkim(data, lookup, job.size)
    dmarc = authcheck.dmarc_policy(data, lookup)
    return Outcome(dkim, dmarc, os.getpid(), time.process_time() - started)


def verify_many(jobs: list[Job]) -> list[Outcome]:
    """``verify`` of each job: one round trip to the worker for a batch of messages."""
    _lowered()
    return [verify(job) for job in jobs]


def ready() -> int:
    """A job that starts a worker ahead of the first message: its pid, once it runs, from now
    on, under its lower priority."""
    _lowered()
    return os.getpid()


_connections: dict[str, sqlite3.Connection] = {}
"""The worker's read-only connection to each SQLite store it has read from."""
_pg_connections: dict[str, Any] = {}
"""The worker's connection to each PostgreSQL store it has read from (psycopg, imported only
here: the postgres extra is installed whenever such a store is configured)."""
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def _forget(database: str) -> None:
    """Drop a connection that failed; the next message opens a new one."""
    _connections.pop(database, None)
    conn = _pg_connections.pop(database, None)
    if conn is not None:
        try:
            conn.close()
        except Exception:  # already broken; nothing more to do
            pass


def _read_postgres(url: str, message_id: str) -> bytes | None:
    """A committed message's bytes from the PostgreSQL store at ``url``: its chunks in order,
    up to MAX_DKIM_SIZE + 1 bytes; None when it is gone."""
    import psycopg  # the postgres extra: only a PostgreSQL store gets here

    conn = _pg_connections.get(url)
    if conn is None:
        conn = psycopg.connect(url, autocommit=True, application_name="mxspool-auth")
        _pg_connections[url] = conn
    limit = authcheck.MAX_DKIM_SIZE + 1
    rows = conn.execute(
        "SELECT b.data FROM messages m JOIN bodies b ON b.message_seq = m.seq"
        " WHERE m.id = %s ORDER BY b.chunk",
        (message_id,),
    ).fetchall()
    if not rows:
        return None
    data = bytearray()
    for (chunk,) in rows:
        data += chunk
        if len(data) >= limit:
            break
    return bytes(data[:limit])


def read_stored(database: str, message_id: str) -> bytes | None:
    """A committed message's bytes from the store at ``database`` (a SQLite file's path, or a
    PostgreSQL URL), up to MAX_DKIM_SIZE + 1, or None when it is gone. Raises the driver's
    error when the store cannot be read."""
    if database.startswith(POSTGRES_SCHEMES):
        return _read_postgres(database, message_id)
    conn = _connections.get(database)
    if conn is None:
        conn = sqlite3.connect(
            f"file:{database}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA busy_timeout = 10000")
        _connections[database] = conn
    row = conn.execute(
        "SELECT substr(b.data, 1, ?) FROM messages m JOIN bodies b ON b.seq = m.seq WHERE m.id = ?",
        (authcheck.MAX_DKIM_SIZE + 1, message_id),
    ).fetchone()
    return None if row is None else bytes(row[0])


def _unreadable(reason: str, started: float) -> Outcome:
    """The outcome of a message whose bytes could not be read: temperror."""
    return Outcome(
        (DkimResult("temperror", reason=reason),),
        DmarcPolicy(final=authcheck.DmarcResult("temperror", reason=reason)),
        os.getpid(),
        time.process_time() - started,
    )


def _read(path: str) -> bytes:
    """A spilled body's bytes, up to MAX_DKIM_SIZE + 1 (enough to tell it is too large)."""
    with open(path, "rb") as file:
        return file.read(authcheck.MAX_DKIM_SIZE + 1)


def _lookup(records: Records, deadline: float) -> authcheck.Lookup:
    def lookup(name: str) -> list[bytes]:
        found = records.get(authcheck.dns_key(name))
        if isinstance(found, str):
            raise authdns.TempError(found)
        if found is not None:
            return found
        return authdns.txt(_settings["nameserver"], name, deadline - time.monotonic())

    return lookup
