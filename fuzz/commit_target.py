"""The commit thread's fuzz target (driven by fuzz_commit.c, which installs an instrumented
``mxspool.store._groupcommit`` before this module is imported).

``one(data)`` decodes ``data`` into work for the commit thread, has it committed, reads the
rows back with Python's sqlite3 module and raises AssertionError unless they are exact. Byte 0
picks the road:

- even: the Committer alone, on a table without type affinity. Rows of four values of any
  type it takes (None, int, float with any bit pattern, str of any code points, bytes of any
  size up to a few MiB) and some it must refuse (lone surrogates, ints past 64 bits, other
  types). The same rows go into a reference table through Python's sqlite3; the outcomes
  (committed, or which row failed its UNIQUE constraint) and the stored values, with their
  SQLite types, must be the same. Some inputs hold the database (lock()) while submitting.
- odd: the whole accept path of the SQLite store (``submit_message``, the accept_rows
  trigger): messages with arbitrary envelopes, parameters, client data and bodies, read back
  with ``get_message`` and ``read_body``.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import select
import shutil
import sqlite3
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from mxspool.body import BodyBuffer
from mxspool.envelope import Envelope, MailParams, RcptParams, Recipient, domain_of
from mxspool.store import _groupcommit
from mxspool.store import sqlite as sqlite_store
from mxspool.store.base import ClientInfo, IncomingMessage

assert sqlite_store.ACCELERATED, "the store does not use the commit thread"

DEADLINE = 30.0  # seconds for one input's commits
MAX_DB_BYTES = 256 << 20  # start a new database past this
SETUP = "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000"
TABLE = "CREATE TABLE t (k INTEGER PRIMARY KEY, a, b, c, d)"
INSERT = "INSERT INTO t (k, a, b, c, d) VALUES (?, ?, ?, ?, ?)"


class Reader:
    """Reads fields off the input; past its end every read gives zeros."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        piece = self.data[self.pos : self.pos + n]
        self.pos += n
        return piece + bytes(n - len(piece))

    def u8(self) -> int:
        return self.take(1)[0]

    def size(self) -> int:
        """Mostly small, sometimes large: 0-255, or 256 bytes to about 4 MiB."""
        n = self.u8()
        if n < 240:
            return n
        return 256 << (n - 240) // 2 if n < 252 else int.from_bytes(self.take(3), "little")

    def blob(self) -> bytes:
        n = self.size()
        seed = self.take(min(n, 64))
        return (seed * (n // max(len(seed), 1) + 1))[:n] if seed else bytes(n)

    def text(self) -> str:
        """Any code points (NUL, controls, non-BMP); never a lone surrogate."""
        raw = self.take(self.u8() % 48)
        kind = self.u8() % 3
        if kind == 0:
            return raw.decode("latin-1")
        if kind == 1:
            return raw.decode("utf-8", "replace")
        return "".join(chr(0x10000 + b * 0x101) for b in raw)


class _Refused:
    """A value the Committer must refuse, with the exception it must raise."""

    def __init__(self, value: object, error: type[Exception]) -> None:
        self.value, self.error = value, error


def _value(reader: Reader) -> object:
    tag = reader.u8() % 10
    if tag == 0:
        return None
    if tag == 1:
        return int.from_bytes(reader.take(8), "little", signed=True)
    if tag == 2:
        return struct.unpack("<d", reader.take(8))[0]
    if tag in (3, 4):
        return reader.text()
    if tag in (5, 6):
        return reader.blob()
    if tag == 7:
        return _Refused(reader.text() + "\udc80", UnicodeEncodeError)
    if tag == 8:
        return _Refused((1 << 63) + reader.u8(), OverflowError)
    return _Refused([reader.u8()], TypeError)


def _same(a: object, b: object) -> bool:
    """Equal values of the same type; floats by bit pattern (NaN, -0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        assert isinstance(b, float)
        return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))
    return a == b


class Databases:
    """The Committer's database and the reference database, renewed when they grow large."""

    def __init__(self) -> None:
        # fuzz/run.sh gives a folder it removes afterwards; else the system's temp folder.
        self.root = Path(tempfile.mkdtemp(prefix="commit-", dir=os.environ.get("FUZZ_DB_DIR")))
        self.generation = 0
        self.next_key = 0
        self.committer: Any = None
        self.store: sqlite_store.SqliteStore | None = None
        self.loop = asyncio.new_event_loop()
        self._open()

    def _open(self) -> None:
        self.generation += 1
        folder = self.root / str(self.generation)
        folder.mkdir()
        self.path, self.ref_path = folder / "t.db", folder / "ref.db"
        for path in (self.path, self.ref_path):
            with sqlite3.connect(path) as conn:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(TABLE)
            conn.close()
        self.ref = sqlite3.connect(self.ref_path, isolation_level=None)
        self.committer = _groupcommit.Committer(str(self.path), SETUP, INSERT, 3)
        self.store = sqlite_store.SqliteStore(f"sqlite:///{folder / 'spool.db'}")
        self.loop.run_until_complete(self.store.open())

    def renew_if_large(self) -> None:
        size = sum(f.stat().st_size for f in self.path.parent.iterdir())
        if size < MAX_DB_BYTES:
            return
        old = self.path.parent
        self.committer.close()
        self.committer.collect()
        assert self.store is not None
        self.loop.run_until_complete(self.store.close())
        self.ref.close()
        shutil.rmtree(old)
        self._open()


_dbs: Databases | None = None


def _databases() -> Databases:
    global _dbs
    if _dbs is None:
        _dbs = Databases()
    return _dbs


def _collect(committer: Any, count: int) -> dict[int, str | None]:
    outcomes: dict[int, str | None] = {}
    deadline = time.monotonic() + DEADLINE
    while len(outcomes) < count:
        assert time.monotonic() < deadline, f"commit thread: {len(outcomes)}/{count} done"
        select.select([committer.fileno()], [], [], 0.5)
        for token, error in committer.collect():
            assert token not in outcomes, f"token {token} reported twice"
            outcomes[token] = error
    return outcomes


def committer_round(dbs: Databases, reader: Reader, hold: bool) -> None:
    rows: list[tuple[object, ...]] = []
    base = dbs.next_key
    dbs.next_key += 64
    for _ in range(1 + reader.u8() % 8):
        key = base + reader.u8() % 12  # repeats: UNIQUE failures, one row failing alone
        rows.append((key, *(_value(reader) for _ in range(4))))
    if hold:
        dbs.committer.lock()
    submitted: dict[int, tuple[object, ...]] = {}
    try:
        for token, row in enumerate(rows):
            refused = [v for v in row if isinstance(v, _Refused)]
            values = tuple(v.value if isinstance(v, _Refused) else v for v in row)
            try:
                dbs.committer.submit(values, token)
            except Exception as exc:  # checked against the refusal expected
                assert refused and isinstance(exc, refused[0].error), f"submit refused {exc!r}"
                continue
            assert not refused, f"submit took {values!r}"
            submitted[token] = values
    finally:
        if hold:
            dbs.committer.unlock()
    outcomes = _collect(dbs.committer, len(submitted))
    assert sorted(outcomes) == sorted(submitted)
    for token, values in submitted.items():
        try:
            dbs.ref.execute(INSERT, values)
            expected_ok = True
        except sqlite3.IntegrityError:
            expected_ok = False
        error = outcomes[token]
        assert (error is None) == expected_ok, f"row {token}: {error!r}, reference ok={expected_ok}"
        if error is not None:
            assert "UNIQUE constraint failed" in error, error
    query = "SELECT k, a, b, c, d FROM t WHERE k >= ? AND k < ? ORDER BY k"
    with sqlite3.connect(f"file:{dbs.path}?mode=ro", uri=True) as conn:
        got = conn.execute(query, (base, base + 64)).fetchall()
    conn.close()
    expected = dbs.ref.execute(query, (base, base + 64)).fetchall()
    assert len(got) == len(expected), f"{len(got)} rows, reference {len(expected)}"
    for g, e in zip(got, expected, strict=True):
        assert all(_same(x, y) for x, y in zip(g, e, strict=True)), f"row {g[0]} differs"


def _message(reader: Reader, number: int) -> IncomingMessage:
    body = BodyBuffer(1 << 30)
    data = reader.blob()
    for start in range(0, len(data), 65536):
        body.write(data[start : start + 65536])
    recipients = tuple(
        Recipient(
            # No NUL: the intake refuses control characters in addresses, and the accept_rows
            # trigger's json_extract would cut the address there (a SQLite limitation).
            (reader.text() + "@" + reader.text()).replace("\0", "?"),
            RcptParams(
                notify=None if reader.u8() & 1 else tuple(reader.text() for _ in range(2)),
                orcpt=None if reader.u8() & 1 else reader.text(),
            ),
        )
        for _ in range(1 + reader.u8() % 5)
    )
    size_param = int.from_bytes(reader.take(7), "little")
    flags = reader.u8()
    return IncomingMessage(
        id=f"FZ{number:012d}",
        envelope=Envelope(
            mail_from=reader.text(),
            mail_params=MailParams(
                size=size_param if flags & 1 else None,
                body=reader.text() if flags & 2 else None,
                smtputf8=bool(flags & 4),
                ret=reader.text() if flags & 8 else None,
                envid=reader.text() if flags & 16 else None,
            ),
            recipients=recipients,
        ),
        client=ClientInfo(
            address=reader.text(),
            helo=reader.text(),
            hostname=reader.text() if flags & 32 else None,
            tls_version=reader.text() if flags & 64 else None,
            tls_cipher=reader.text() if flags & 128 else None,
        ),
        received_at=struct.unpack("<d", reader.take(7) + b"\x41")[0],  # finite, positive
        message_id=reader.text() or None,
        body=body,
        tags=tuple(
            t for t in (reader.text().replace(",", ";") for _ in range(reader.u8() % 3)) if t
        ),
    )


def _settle(future: asyncio.Future[BaseException | None], error: BaseException | None) -> None:
    future.set_result(error)


async def _accept_and_read(
    store: sqlite_store.SqliteStore, messages: list[IncomingMessage]
) -> None:
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[BaseException | None]] = [loop.create_future() for _ in messages]
    for message, future in zip(messages, futures, strict=True):
        assert not message.body.spilled
        store.submit_message(message, functools.partial(_settle, future))
    errors = await asyncio.wait_for(asyncio.gather(*futures), DEADLINE)
    assert errors == [None] * len(messages), errors
    for message in messages:
        stored = await store.get_message(message.id)
        assert stored is not None, f"{message.id} is not in the store"
        body = b"".join([piece async for piece in store.read_body(message.id)])
        assert body == message.body.getvalue(), f"{message.id}: body differs"
        client = message.client
        assert (stored.mail_from, stored.mail_params) == (
            message.envelope.mail_from,
            message.envelope.mail_params,
        ), f"{message.id}: envelope differs"
        assert stored.client == client, f"{message.id}: {stored.client!r} != {client!r}"
        assert (stored.size, stored.sha256) == (message.body.size, message.body.sha256)
        assert stored.message_id == message.message_id
        assert stored.received_at == message.received_at
        assert stored.tags == message.tags, f"{stored.tags!r} != {message.tags!r}"
        got = [(r.address, r.domain, r.params) for r in stored.recipients]
        want = [(r.address, domain_of(r.address), r.params) for r in message.envelope.recipients]
        assert got == want, f"{message.id}: recipients {got!r} != {want!r}"


def store_round(dbs: Databases, reader: Reader) -> None:
    assert dbs.store is not None
    messages = []
    for _ in range(1 + reader.u8() % 4):
        dbs.next_key += 1
        messages.append(_message(reader, dbs.next_key))
    dbs.loop.run_until_complete(_accept_and_read(dbs.store, messages))


def one(data: bytes) -> None:
    dbs = _databases()
    reader = Reader(data)
    road = reader.u8()
    if road & 1:
        store_round(dbs, reader)
    else:
        committer_round(dbs, reader, hold=bool(road & 2))
    dbs.renew_if_large()
