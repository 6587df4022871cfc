"""The SQLite store's C commit thread (mxspool.store._groupcommit), on real database files.

The store contract suite runs the SQLite store with and without it; these tests pin down what
only the thread itself shows: it takes turns with the Python writer, one failing row fails
alone, a failed transaction fails the whole batch and the thread recovers, and close()
commits what is queued.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import select
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mxspool import body as body_module
from mxspool.store import sqlite
from mxspool.store.base import DomainChanges, DomainMode
from tests.store.test_contract import add_domain, make_message
from tests.waiting import eventually, stays

needs_thread = pytest.mark.skipif(
    not sqlite.ACCELERATED, reason="mxspool.store._groupcommit is not built"
)
"""Every test but the build guard below needs the thread; the guard must run to fail."""

SETUP = "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 100"
INSERT = "INSERT INTO t (k, v, n, f) VALUES (?, ?, ?, ?)"


def test_the_commit_thread_is_built_where_ci_requires_it() -> None:
    """With MXSPOOL_REQUIRE_SPEEDUPS=1 (CI), a missing C thread fails here instead of skipping."""
    if sqlite.ACCELERATED:
        return
    if os.environ.get("MXSPOOL_REQUIRE_SPEEDUPS") == "1":
        pytest.fail(
            "mxspool.store._groupcommit did not build (no C compiler or no sqlite3.h?): "
            "install them and reinstall the package, or unset MXSPOOL_REQUIRE_SPEEDUPS"
        )
    pytest.skip("mxspool.store._groupcommit is not built (MXSPOOL_REQUIRE_SPEEDUPS=1 fails here)")


def _database(tmp_path: Path) -> Path:
    path = tmp_path / "t.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v BLOB, n INTEGER, f REAL)")
    conn.close()
    return path


def _committer(path: Path) -> Any:
    assert sqlite._groupcommit is not None
    return sqlite._groupcommit.Committer(str(path), SETUP, INSERT, 64)


def _wait_collect(committer: Any, count: int, timeout: float = 10.0) -> list[tuple[Any, Any]]:
    got: list[tuple[Any, Any]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        select.select([committer.fileno()], [], [], 0.5)
        got += committer.collect()
    return got


def _rows(path: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT k, v, n, f FROM t ORDER BY k").fetchall()
    finally:
        conn.close()


@needs_thread
def test_rows_are_committed_exactly_and_reported_in_order(tmp_path: Path) -> None:
    path = _database(tmp_path)
    committer = _committer(path)
    values = [(f"k{i:03}", bytes([i]) * (i * 100), i, i / 4) for i in range(200)]
    for i, row in enumerate(values):
        committer.submit(row, i)
    assert _wait_collect(committer, 200) == [(i, None) for i in range(200)]
    committer.close()
    assert _rows(path) == values


def _block_until_pending(committer: Any, timeout: float = 10.0) -> None:
    """Wait for a finished job without yielding to any event loop: on the thread's wake-up
    pipe, which it writes once the job is listed as done."""
    readable, _, _ = select.select([committer.fileno()], [], [], timeout)
    assert readable, "the commit thread did not finish the job"


@needs_thread
def test_pending_says_when_collect_has_something(tmp_path: Path) -> None:
    """pending() (no lock, no system call) turns true once a job is done, and false once it is
    collected: what the event loop looks at on every event (SqliteStore.deliver_ready)."""
    committer = _committer(_database(tmp_path))
    try:
        assert committer.pending() is False  # nothing submitted
        committer.lock()  # hold the thread: the job is queued, not done
        committer.submit(("a", b"1", 1, None), "first")
        stays(lambda: not committer.pending(), 0.2, "nothing pending before the commit")
        committer.unlock()
        _block_until_pending(committer)
        assert committer.pending() is True
        assert committer.collect() == [("first", None)]
        assert committer.pending() is False
        # The pipe was drained with the jobs: no wake-up is left over for a collect of nothing.
        assert select.select([committer.fileno()], [], [], 0)[0] == []
    finally:
        committer.close()
    assert committer.pending() is False  # closed


@needs_thread
def test_one_failing_row_fails_alone(tmp_path: Path) -> None:
    path = _database(tmp_path)
    committer = _committer(path)
    committer.lock()  # hold the thread so that all three share one transaction
    committer.submit(("a", b"1", 1, None), "first")
    committer.submit(("a", b"2", 2, None), "duplicate")
    committer.submit(("b", None, None, 0.5), "third")
    committer.unlock()
    outcomes = dict(_wait_collect(committer, 3))
    committer.close()
    assert outcomes["first"] is None and outcomes["third"] is None
    assert outcomes["duplicate"].startswith("store write failed: UNIQUE constraint failed")
    assert _rows(path) == [("a", b"1", 1, None), ("b", None, None, 0.5)]


@needs_thread
def test_a_failed_transaction_fails_the_batch_and_the_thread_recovers(tmp_path: Path) -> None:
    path = _database(tmp_path)
    committer = _committer(path)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database past busy_timeout
    committer.submit(("x", b"", 0, None), "blocked")
    (outcome,) = _wait_collect(committer, 1)
    assert outcome[0] == "blocked"
    assert outcome[1].startswith("commit failed: database is locked")
    blocker.execute("ROLLBACK")
    blocker.close()
    committer.submit(("y", b"", 0, None), "later")
    assert _wait_collect(committer, 1) == [("later", None)]
    committer.close()
    assert [row[0] for row in _rows(path)] == ["y"]


@needs_thread
def test_lock_keeps_the_thread_out_until_unlock(tmp_path: Path) -> None:
    path = _database(tmp_path)
    committer = _committer(path)
    # Positive control: unlocked, the thread commits a row; how long it took sizes the wait.
    started = time.monotonic()
    committer.submit(("free", b"", 0, None), "free")
    assert _wait_collect(committer, 1) == [("free", None)]
    quiet = max(0.3, 10 * (time.monotonic() - started))
    committer.lock()
    committer.submit(("held", b"", 0, None), "held")
    stays(lambda: committer.collect() == [], quiet, "no outcome while locked")
    assert [row[0] for row in _rows(path)] == ["free"]
    committer.unlock()
    assert _wait_collect(committer, 1) == [("held", None)]
    committer.close()


@needs_thread
def test_close_commits_what_is_queued(tmp_path: Path) -> None:
    path = _database(tmp_path)
    committer = _committer(path)
    for i in range(50):
        committer.submit((f"q{i:02}", b"x", i, None), i)
    committer.close()
    assert committer.collect() == [(i, None) for i in range(50)]
    assert len(_rows(path)) == 50
    with pytest.raises(RuntimeError, match="closed"):
        committer.submit(("late", b"", 0, None), "late")


@needs_thread
def test_bad_values_are_refused_before_anything_is_queued(tmp_path: Path) -> None:
    path = _database(tmp_path)
    committer = _committer(path)
    with pytest.raises(ValueError, match="takes 4 values"):
        committer.submit(("k", b"v"), "short")
    with pytest.raises(TypeError, match="list"):
        committer.submit(("k", [1], 0, None), "list")
    with pytest.raises(OverflowError):
        committer.submit(("k", b"", 1 << 70, None), "huge")
    committer.close()
    assert committer.collect() == []
    assert _rows(path) == []


@needs_thread
def test_a_bad_statement_or_path_fails_at_construction(tmp_path: Path) -> None:
    assert sqlite._groupcommit is not None
    with pytest.raises(OSError, match="no such table"):
        sqlite._groupcommit.Committer(
            str(_database(tmp_path)), SETUP, "INSERT INTO nope VALUES (?)", 8
        )
    with pytest.raises(OSError, match="unable to open"):
        sqlite._groupcommit.Committer(str(tmp_path / "missing" / "x.db"), SETUP, INSERT, 8)


@needs_thread
async def test_accepts_and_python_writes_take_turns(tmp_path: Path) -> None:
    """Accepts on the C thread and domain changes on the Python writer, at the same time."""
    store = sqlite.SqliteStore(f"sqlite:///{tmp_path / 'spool.db'}")
    await store.open()
    try:
        assert store._committer is not None
        await add_domain(store, "relay.test", DomainMode.HOLD)
        messages = [make_message([f"u{i}@relay.test"]) for i in range(300)]

        async def flip_modes() -> None:
            for i in range(40):
                mode = DomainMode.HOLD if i % 2 else DomainMode.RELAY
                await store.update_domain("relay.test", DomainChanges(mode=mode))

        await asyncio.gather(flip_modes(), *(store.accept_message(m) for m in messages))
        assert len(await store.list_queue(limit=1000)) == 300
        domain = await store.get_domain("relay.test")
        assert domain is not None and domain.mode is DomainMode.HOLD
    finally:
        await store.close()


@needs_thread
async def test_deliver_ready_answers_a_finished_commit_before_the_loop_turns(
    tmp_path: Path,
) -> None:
    """SqliteStore.deliver_ready calls back the commits already done, there and then, without
    the loop's wake-up from the pipe; each callback runs once whichever path sees it first."""
    store = sqlite.SqliteStore(f"sqlite:///{tmp_path / 'spool.db'}")
    await store.open()
    try:
        committer = store._committer
        assert committer is not None
        await add_domain(store, "relay.test", DomainMode.HOLD)
        calls: list[tuple[str, BaseException | None]] = []
        first = make_message(["a@relay.test"])
        committer.lock()  # the thread cannot commit yet
        store.submit_message(first, lambda error: calls.append((first.id, error)))
        store.deliver_ready()
        assert calls == []  # not done: nothing is called
        committer.unlock()
        _block_until_pending(committer)  # the loop does not turn: its pipe reader cannot run
        assert calls == []  # the control: done, but not yet called back
        store.deliver_ready()
        assert calls == [(first.id, None)]
        # deliver_ready drained the pipe with the job: no wake-up is left for a second call.
        assert select.select([committer.fileno()], [], [], 0)[0] == []
        assert calls == [(first.id, None)]
        # Many at once, each delivered once, by whichever path comes first.
        messages = [make_message([f"u{i}@relay.test"]) for i in range(200)]
        for i, message in enumerate(messages):
            store.submit_message(message, lambda error, m=message: calls.append((m.id, error)))
            if i % 3 == 0:
                store.deliver_ready()
            if i == 99:  # the loop turns until the first half is in: the pipe's path calls too
                await eventually(lambda: len(calls) >= 101, 10, "the first half's callbacks")
        await eventually(lambda: len(calls) >= 201, 10, "every callback")
        assert sorted(calls, key=lambda c: c[0]) == sorted(
            [(first.id, None)] + [(m.id, None) for m in messages], key=lambda c: c[0]
        )
    finally:
        await store.close()


FULL_DISK_SCRIPT = """
import json, resource, select, sys
from mxspool.store._groupcommit import Committer

path, setup, insert = sys.argv[1:4]
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # writes past 1 MiB: EFBIG

def wait(committer, count):
    got = []
    while len(got) < count:
        select.select([committer.fileno()], [], [], 5)
        got += committer.collect()
    return got

committer = Committer(path, setup, insert, 64)
committer.lock()  # one transaction for both
committer.submit(("small", b"s", 1, None), "small")
committer.submit(("big", b"b" * (3 << 20), 2, None), "big")
committer.unlock()
first = wait(committer, 2)
committer.submit(("after", b"a", 3, None), "after")
second = wait(committer, 1)
committer.close()
print(json.dumps([first, second]))
"""


@needs_thread
def test_an_io_error_fails_the_whole_batch_and_the_next_one_succeeds(tmp_path: Path) -> None:
    """A real I/O error (a file-size limit, like a full disk) in the middle of a batch."""
    path = _database(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK_SCRIPT, str(path), SETUP, INSERT],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    first, second = json.loads(proc.stdout)
    outcomes = dict(first)
    assert set(outcomes) == {"small", "big"}
    assert all(error is not None for error in outcomes.values()), outcomes
    assert "disk I/O error" in outcomes["big"] or "full" in outcomes["big"], outcomes
    assert second == [["after", None]]
    assert [row[0] for row in _rows(path)] == ["after"]


@needs_thread
def test_the_thread_is_named_for_operators(tmp_path: Path) -> None:
    """`top -H` and `ps -L` show it as mxspool-commit."""
    committer = _committer(_database(tmp_path))
    try:
        names = {(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()}
        assert "mxspool-commit" in names
    finally:
        committer.close()


@needs_thread
def test_the_thread_gets_its_turn_while_python_keeps_writing(tmp_path: Path) -> None:
    """A Python writer that takes the database back to back does not starve the accepts."""
    path = _database(tmp_path)
    committer = _committer(path)
    stop = threading.Event()
    writing = threading.Event()

    def python_writer() -> None:
        committer.lock()
        writing.set()
        while not stop.is_set():
            time.sleep(0.002)  # a transaction of the Python writer
            committer.unlock()
            committer.lock()  # at once: the next one was already waiting
        committer.unlock()

    def twenty(first: int) -> float:
        started = time.monotonic()
        for i in range(first, first + 20):
            committer.submit((f"t{i:02}", b"x", i, None), i)
            assert _wait_collect(committer, 1, timeout=5.0) == [(i, None)]
        return time.monotonic() - started

    alone = twenty(0)  # the baseline: this machine's fsyncs, however slow today
    writer = threading.Thread(target=python_writer)
    writer.start()
    try:
        assert writing.wait(10), "the Python writer did not start"
        contended = twenty(20)
        print(f"20 accepts: {alone:.3f} s alone, {contended:.3f} s against a busy Python writer")
        # A turn costs at most one of the writer's 2 ms transactions per accept.
        assert contended < 3 * alone + 1.0, (alone, contended)
    finally:
        stop.set()
        writer.join()
        committer.close()
    assert len(_rows(path)) == 40


@needs_thread
def test_the_commit_thread_needs_synchronous_full(tmp_path: Path) -> None:
    """Its write-coalescing VFS relies on a sync before frames are published."""
    assert sqlite._groupcommit is not None
    relaxed = "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL"
    with pytest.raises(OSError, match="synchronous = FULL"):
        sqlite._groupcommit.Committer(str(_database(tmp_path)), relaxed, INSERT, 8)


@needs_thread
def test_coalesced_writes_read_back_exactly_while_the_thread_writes(tmp_path: Path) -> None:
    """Rows of many sizes (up to several write pieces each), checkpointed often, are whole
    for another connection after every group, and the file passes integrity_check."""
    path = _database(tmp_path)
    assert sqlite._groupcommit is not None
    # Checkpoints every 64 pages: the thread writes the main file (coalesced too) and restarts
    # the WAL many times.
    committer = sqlite._groupcommit.Committer(
        str(path), SETUP + "; PRAGMA wal_autocheckpoint = 64", INSERT, 64
    )
    reader = sqlite3.connect(path)
    expected: dict[str, bytes] = {}
    try:
        for group in range(12):
            keys = []
            for i in range(25):
                key = f"r{group:02}{i:02}"
                blob = os.urandom(1 + (group * 25 + i) * 7919 % 400_000)
                expected[key] = blob
                keys.append(key)
                committer.submit((key, blob, len(blob), None), key)
            assert _wait_collect(committer, 25) == [(key, None) for key in keys]
            assert dict(reader.execute("SELECT k, v FROM t").fetchall()) == expected
    finally:
        reader.close()
        committer.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (300,)
    finally:
        conn.close()


@needs_thread
def test_the_thread_computes_sha256_with_openssl(tmp_path: Path) -> None:
    """mxspool_sha256 on the thread's connection: the hex SHA-256 of the bound bytes, binary
    and empty ones too, NULL for NULL; the same as hashlib (the reference)."""
    path = _database(tmp_path)
    assert sqlite._groupcommit is not None
    committer = sqlite._groupcommit.Committer(
        str(path), SETUP, "INSERT INTO t (k, v, n, f) VALUES (?1, mxspool_sha256(?2), ?3, ?4)", 8
    )
    bodies: dict[str, bytes | None] = {
        "binary": bytes(range(256)) * 64 + b"\x00tail",
        "empty": b"",
        "large": os.urandom(3 << 20),
        "null": None,
    }
    for key, body in bodies.items():
        committer.submit((key, body, 0, None), key)
    assert sorted(_wait_collect(committer, len(bodies))) == [(key, None) for key in sorted(bodies)]
    committer.close()
    stored = {row[0]: row[1] for row in _rows(path)}
    for key, body in bodies.items():
        expected = None if body is None else hashlib.sha256(body).hexdigest()
        assert stored[key] == expected, key


@needs_thread
async def test_the_event_loop_does_not_hash_what_the_thread_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body in memory goes to the commit thread unhashed: with Python's SHA-256 out of the
    body's reach the accept still stores the right digest. Control: the Python writer, which
    does need it, fails the same accept."""

    def no_hashing(*args: object) -> object:
        raise AssertionError("the body was hashed in Python")

    data = b"Subject: digest\r\n\r\n" + bytes(range(256)) * 40 + b"\r\n"
    expected = hashlib.sha256(data).hexdigest()
    for accelerated in (True, False):
        monkeypatch.setattr(sqlite, "ACCELERATED", accelerated)
        store = sqlite.SqliteStore(f"sqlite:///{tmp_path / f'spool-{accelerated}.db'}")
        await store.open()
        try:
            await add_domain(store, "relay.test", DomainMode.HOLD)
            message = make_message(["a@relay.test"], data)
            with monkeypatch.context() as patched:
                patched.setattr(body_module.hashlib, "sha256", no_hashing)
                if accelerated:
                    await store.accept_message(message)
                else:
                    with pytest.raises(AssertionError, match="hashed in Python"):
                        await store.accept_message(message)
                    continue
            stored = await store.get_message(message.id)
            assert stored is not None and stored.sha256 == expected
            assert b"".join([piece async for piece in store.read_body(message.id)]) == data
        finally:
            await store.close()
