"""When the SQLite store copies its WAL into the main file (``SqliteStore._checkpoint_loop``):
not while a burst of commits goes on, but once commits pause; while they go on only past
``WAL_SOFT_LIMIT``; and at a clean close. Real files; the main file's bytes tell whether a
checkpoint wrote it (in WAL mode nothing else does)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mxspool.store import sqlite as sqlite_store
from mxspool.store.sqlite import SqliteStore
from tests.store.test_contract import make_message
from tests.waiting import eventually

BODY = b"Subject: burst\r\n\r\n" + b"x" * 60_000 + b"\r\n"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wal_size(db: Path) -> int:
    wal = Path(f"{db}-wal")
    return wal.stat().st_size if wal.exists() else 0


async def burst(store: SqliteStore, seconds: float, db: Path, unchanged: str | None) -> int:
    """Commit messages back to back for ``seconds``; with ``unchanged``, check after each that
    the main file still has that digest. How many were committed."""
    count = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await store.accept_message(make_message(["u@example.test"], BODY))
        count += 1
        if unchanged is not None:
            assert digest(db) == unchanged, f"the main file was written after {count} commits"
    return count


async def settled(db: Path, within: float = 10.0) -> str:
    """The main file's digest once it has not changed for half a second."""
    deadline = time.monotonic() + within
    last = digest(db)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = digest(db)
        if now == last:
            return now
        last = now
    raise TimeoutError(f"{db} kept changing for {within:g} s")


@pytest.fixture
async def opened(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(f"sqlite:///{tmp_path / 'spool.db'}")
    await store.open()
    yield store
    await store.close()


async def test_a_burst_stays_in_the_wal_until_commits_pause(opened: SqliteStore) -> None:
    store, db = opened, opened.path
    before = await settled(db)
    # Commits every few ms for well over CHECKPOINT_QUIET: nothing is copied meanwhile ...
    count = await burst(store, 1.0, db, before)
    assert count > 20 and wal_size(db) > count * len(BODY)
    # ... and once they pause, the WAL is copied into the main file.
    await eventually(lambda: digest(db) != before, within=5, what="the checkpoint")
    # Once the copy is complete, the WAL starts again from its beginning at the next commit:
    # the file is cut back.
    await settled(db)
    await store.accept_message(make_message(["u@example.test"], BODY))
    assert wal_size(db) <= sqlite_store.WAL_KEEP


async def test_past_the_soft_limit_the_wal_is_copied_while_commits_go_on(
    opened: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, db = opened, opened.path
    before = await settled(db)
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_QUIET", 3600.0)  # commits never "pause"
    monkeypatch.setattr(sqlite_store, "WAL_SOFT_LIMIT", 512 * 1024)
    # The control is the test above: below the limit a burst writes nothing to the main file.
    copied = False
    deadline = time.monotonic() + 10
    while not copied and time.monotonic() < deadline:
        await burst(store, 0.05, db, None)
        copied = digest(db) != before
    assert copied, "nothing was copied during a burst past the soft limit"


async def test_a_clean_close_folds_the_wal_into_the_main_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_QUIET", 3600.0)  # no copy before the close
    store = SqliteStore(f"sqlite:///{tmp_path / 'spool.db'}")
    await store.open()
    db = store.path
    before = digest(db)
    messages = [make_message(["u@example.test"], BODY) for _ in range(30)]
    for message in messages:
        await store.accept_message(message)
    assert digest(db) == before and wal_size(db) > 30 * len(BODY)  # all of it in the WAL
    await store.close()
    assert digest(db) != before and wal_size(db) == 0  # copied, and the WAL removed
    again = SqliteStore(f"sqlite:///{db}")
    await again.open()
    try:
        for message in messages:
            assert await again.get_message(message.id) is not None
    finally:
        await again.close()
