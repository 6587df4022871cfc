"""When the SQLite store copies its WAL into the main file (``SqliteStore._checkpoint_loop``):
not while a burst of commits goes on, but once commits pause; while they go on only past
``WAL_SOFT_LIMIT``; and at a clean close. Real files; the main file's bytes tell whether a
checkpoint wrote it (in WAL mode nothing else does)."""

from __future__ import annotations

import hashlib
import sys
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


def copied(db: Path) -> bool:
    """Every frame in the WAL is in the main file: the wal-index's nBackfill equals its mxFrame
    (https://sqlite.org/walformat.html: mxFrame at byte 16 of the first header copy, nBackfill
    at byte 96, native byte order)."""
    shm = Path(f"{db}-shm")
    if not shm.exists():
        return True
    head = shm.read_bytes()[:100]
    frames = int.from_bytes(head[16:20], sys.byteorder)
    return int.from_bytes(head[96:100], sys.byteorder) == frames


@pytest.fixture
async def opened(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(f"sqlite:///{tmp_path / 'spool.db'}")
    await store.open()
    yield store
    await store.close()


async def test_a_burst_stays_in_the_wal_until_commits_pause(opened: SqliteStore) -> None:
    store, db = opened, opened.path
    await eventually(lambda: copied(db), what="the start's writes copied")
    before = digest(db)
    # Commits every few ms for well over CHECKPOINT_QUIET: nothing is copied meanwhile ...
    count = await burst(store, 1.0, db, before)
    assert count > 20 and wal_size(db) > count * len(BODY)
    # ... and once they pause, the WAL is copied into the main file.
    await eventually(lambda: digest(db) != before, within=5, what="the checkpoint")
    # Once the copy is complete, the WAL starts again from its beginning at the next commit:
    # the file is cut back.
    await eventually(lambda: copied(db), what="the whole WAL copied")
    await store.accept_message(make_message(["u@example.test"], BODY))
    assert wal_size(db) <= sqlite_store.WAL_KEEP


async def test_past_the_soft_limit_the_wal_is_copied_while_commits_go_on(
    opened: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, db = opened, opened.path
    await eventually(lambda: copied(db), what="the start's writes copied")
    before = digest(db)
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_QUIET", 3600.0)  # commits never "pause"
    monkeypatch.setattr(sqlite_store, "WAL_SOFT_LIMIT", 512 * 1024)
    # The control is the test above: below the limit a burst writes nothing to the main file.
    written = False
    deadline = time.monotonic() + 10
    while not written and time.monotonic() < deadline:
        await burst(store, 0.05, db, None)
        written = digest(db) != before
    assert written, "nothing was copied during a burst past the soft limit"


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
