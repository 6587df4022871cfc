"""A finished commit is answered at the intake's next event, not at the loop's next turn.

The SQLite store's commit thread reports finished commits through a pipe the event loop
watches; under load the loop reaches that pipe only after the events ahead of it, and the
client waits that long for its 250. So the intake also asks the store at every event it
handles (``Store.deliver_ready``). Here the loop's watch on the pipe is taken away, so that
only that path can answer: the 250 of a committed message goes out when another client's
connection or bytes arrive, and not before (the control).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.smtp.listening import listening_intake
from tests.smtp_client import RawClient
from tests.waiting import eventually

from mxspool.config import SmtpConfig
from mxspool.store import sqlite
from mxspool.store.sqlite import SqliteStore

pytestmark = pytest.mark.skipif(
    not sqlite.ACCELERATED, reason="mxspool.store._groupcommit is not built"
)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[SqliteStore, int]]:
    async with listening_intake(tmp_path, SmtpConfig(hostname="mx.test.local")) as listening:
        yield listening.store, listening.port


def _until_end_of_data(port: int) -> RawClient:
    client = RawClient(port)
    assert client.reply()[0] == 220
    assert client.command("EHLO a.client")[0] == 250
    assert client.command("MAIL FROM:<s@src.test>")[0] == 250
    assert client.command("RCPT TO:<u@example.test>")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(b"Subject: answered by the next event\r\n\r\nbody\r\n.\r\n")
    return client


async def test_a_finished_commit_is_answered_at_another_clients_event(
    served: tuple[SqliteStore, int],
) -> None:
    store, port = served
    committer = store._committer
    assert committer is not None
    loop = asyncio.get_running_loop()
    loop.remove_reader(committer.fileno())  # only the intake's look can answer now
    first: RawClient | None = None
    other: RawClient | None = None
    try:
        first = await asyncio.to_thread(_until_end_of_data, port)
        await eventually(committer.pending, 10, "the commit to finish")
        # The control: committed, and no event has come since, so no 250 has gone out.
        assert await asyncio.to_thread(first.quiet_for, 0.3)
        other = await asyncio.to_thread(RawClient, port)  # a connection is an event
        code, text = await asyncio.to_thread(first.reply)
        assert code == 250 and "queued as" in text, text
        assert (await asyncio.to_thread(other.reply))[0] == 220
        # And bytes from a client are one too: the next message's commit, answered at a NOOP.
        second = await asyncio.to_thread(_until_end_of_data, port)
        try:
            await eventually(committer.pending, 10, "the second commit to finish")
            assert await asyncio.to_thread(second.quiet_for, 0.3)
            assert (await asyncio.to_thread(other.command, "NOOP"))[0] == 250
            assert (await asyncio.to_thread(second.reply))[0] == 250
        finally:
            second.close()
        assert len(await store.list_queue(limit=10)) == 2
    finally:
        loop.add_reader(committer.fileno(), store._deliver_commits)
        for client in (first, other):
            if client is not None:
                client.close()
