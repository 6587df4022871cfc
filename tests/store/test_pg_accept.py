"""The PostgreSQL accept path: a group-commit batch costs one round trip to the server, the
intake's submit_message puts no task on the loop per message, and the store does not open
where a COMMIT would not wait for the WAL (synchronous_commit = off).

A small TCP proxy between the store and PostgreSQL reads the wire protocol in both directions
(sslmode=disable, so it is readable): the statements the store executes (Query, or Bind of what
a Parse prepared) and the server's ReadyForQuery ('Z'), which ends every round trip the client
waits for and tells whether a transaction is open ('T') or not ('I').
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mxspool.store.base import StoreError
from mxspool.store.postgres import PostgresStore
from tests.store.test_contract import make_message

DEADLINE = 30.0


@dataclass
class Wire:
    """What one proxied connection carried, in order: ("sql", text) sent by the client,
    ("ready", status) when the server said ReadyForQuery."""

    events: list[tuple[str, str]] = field(default_factory=list)
    prepared: dict[bytes, str] = field(default_factory=dict)


class Proxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.wires: list[Wire] = []
        self.pumps: set[asyncio.Future[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        wire = Wire()
        self.wires.append(wire)
        both = {
            asyncio.ensure_future(self._pump(reader, up_writer, wire, client=True)),
            asyncio.ensure_future(self._pump(up_reader, writer, wire, client=False)),
        }
        self.pumps |= both
        try:
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in both:
                task.cancel()
            for w in (writer, up_writer):
                w.close()

    async def close(self) -> None:
        for task in self.pumps:
            task.cancel()
        await asyncio.wait(self.pumps, timeout=DEADLINE)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        wire: Wire,
        *,
        client: bool,
    ) -> None:
        if client:  # the StartupMessage has no type byte
            head = await reader.readexactly(4)
            writer.write(head + await reader.readexactly(struct.unpack("!I", head)[0] - 4))
        while True:
            try:
                head = await reader.readexactly(5)
            except asyncio.IncompleteReadError:
                return
            kind, length = head[:1], struct.unpack("!I", head[1:])[0]
            body = await reader.readexactly(length - 4)
            if client and kind == b"Q":
                wire.events.append(("sql", body.split(b"\0")[0].decode()))
            elif client and kind == b"P":  # Parse: statement name, then the query
                name, query = body.split(b"\0")[:2]
                wire.prepared[name] = query.decode()
            elif client and kind == b"B":  # Bind (the execution): portal, then statement
                wire.events.append(("sql", wire.prepared[body.split(b"\0")[1]]))
            elif not client and kind == b"Z":
                wire.events.append(("ready", body.decode()))
            writer.write(head + body)
            await writer.drain()


@contextlib.asynccontextmanager
async def proxied(url: str) -> AsyncIterator[tuple[Proxy, str]]:
    params = conninfo_to_dict(url)
    proxy = Proxy(str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield proxy, make_conninfo(url, host="127.0.0.1", port=str(port), sslmode="disable")
    finally:
        server.close()
        await proxy.close()
        await server.wait_closed()


def the_batch_round_trip(wire: Wire) -> tuple[str, list[str], str]:
    """The transaction status the server reported before the batch's INSERT was sent, the
    statements of the round trip that carried it, and the status that round trip ended in."""
    insert = next(i for i, (_, text) in enumerate(wire.events) if "INSERT INTO messages" in text)
    before = max(i for i, (kind, _) in enumerate(wire.events[:insert]) if kind == "ready")
    after = next(i for i, (kind, _) in enumerate(wire.events) if i > insert and kind == "ready")
    sent = [text for kind, text in wire.events[before + 1 : after] if kind == "sql"]
    return wire.events[before][1], sent, wire.events[after][1]


async def test_a_batch_of_accepts_is_one_round_trip(pg_url: str) -> None:
    async with proxied(pg_url) as (proxy, url):
        store = PostgresStore(url)
        await store.open()
        try:
            messages = [make_message([f"u{i}@relay.test"], b"x" * 10240) for i in range(20)]
            loop = asyncio.get_running_loop()
            done: asyncio.Queue[BaseException | None] = asyncio.Queue()
            tasks_before = len(asyncio.all_tasks())
            for message in messages:  # all queued before the writer runs: one batch
                store.submit_message(message, done.put_nowait)
            # The intake's hot path schedules no task per message.
            assert len(asyncio.all_tasks()) == tasks_before
            deadline = loop.time() + DEADLINE
            results = [await asyncio.wait_for(done.get(), deadline - loop.time()) for _ in messages]
            assert results == [None] * len(messages)
            for message in messages[::7]:
                assert await store.get_message(message.id) is not None
        finally:
            await store.close()
    wires = [w for w in proxy.wires if any("INSERT INTO messages" in t for _, t in w.events)]
    assert len(wires) == 1, "the batch went out on one connection, as one batch"
    before, sent, after = the_batch_round_trip(wires[0])
    assert sum("INSERT INTO messages" in text for text in sent) == 1, sent
    # No transaction was open when the batch went out, and none is when its answer came back:
    # the batch's transaction began and committed within that one round trip.
    assert (before, after) == ("I", "I"), sent


async def test_a_store_without_synchronous_commit_refuses_to_open(pg_url: str) -> None:
    """A COMMIT that returns before the WAL is flushed would make a 250 a promise the store
    cannot keep after a PostgreSQL crash: the store says so and does not open."""
    assert "options=-csearch_path" in pg_url
    unsafe = pg_url.replace("options=", "options=-csynchronous_commit%3Doff%20", 1)
    store = PostgresStore(unsafe)
    with pytest.raises(StoreError, match="synchronous_commit = off"):
        await store.open()
    # The positive control: the same schema with the server's setting (on) opens.
    store = PostgresStore(pg_url)
    await store.open()
    await store.close()
