"""A PostgreSQL node's claim on its name (mxspool.store.nodename): two running nodes of one
spool never share one; the claim of a node that died goes with its connection; a node whose
claim was lost takes it back, or stops when another node took it meanwhile."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable

import psycopg
import pytest

from mxspool import service
from mxspool.config import Config, SmtpConfig, StoreConfig
from mxspool.store import nodename
from mxspool.store.base import StoreError
from mxspool.store.nodename import NodeName, NodeNameTaken
from mxspool.store.postgres import PostgresStore
from tests.conftest import free_port
from tests.waiting import eventually

Make = Callable[[str, str], NodeName]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    made: list[NodeName] = []

    def new(url: str, name: str) -> NodeName:
        made.append(NodeName(url, name))
        return made[-1]

    yield new
    for claim in made:
        await claim.close()


def _backend_of(server: str, name: str) -> int | None:
    with psycopg.connect(server, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            (f"mxspool node {name}",),
        ).fetchone()
    return None if row is None else int(row[0])


def _terminate(server: str, pid: int) -> None:
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


async def _claimed_then_cut(make: Make, pg_url: str, pg_server: str, name: str) -> NodeName:
    """A claim whose connection PostgreSQL then ends (a restart, or the network dropped it)."""
    claim = make(pg_url, name)
    await claim.claim()
    pid = _backend_of(pg_server, name)
    assert pid is not None
    _terminate(pg_server, pid)
    await eventually(lambda: _backend_of(pg_server, name) is None, what="the claim cut")
    return claim


async def test_a_second_node_with_the_name_is_refused_and_says_who_has_it(
    make: Make, pg_url: str, pg_server: str
) -> None:
    await make(pg_url, "mx1.example.net").claim()
    with pytest.raises(NodeNameTaken) as refused:
        await make(pg_url, "mx1.example.net").claim(wait=0.5)
    message = str(refused.value)
    assert "another node named 'mx1.example.net'" in message
    assert "127.0.0.1" in message  # the holder's address
    assert "[smtp] hostname" in message  # what to do
    # The controls: another name on the same spool, and the same name on another spool (schema).
    await make(pg_url, "mx2.example.net").claim(wait=0.5)
    await make(pg_server, "mx1.example.net").claim(wait=0.5)


async def test_the_name_is_free_once_its_holder_lets_go(
    make: Make, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = make(pg_url, "mx1.example.net")
    await first.claim()
    second = make(pg_url, "mx1.example.net")
    waiting = asyncio.ensure_future(second.claim(wait=20))
    await eventually(lambda: "is held by a connection from" in caplog.text, what="the wait")
    assert not waiting.done()  # held: it waits
    await first.close()
    await asyncio.wait_for(waiting, 10)  # taken within a try or two
    with pytest.raises(NodeNameTaken):
        await make(pg_url, "mx1.example.net").claim(wait=0)


async def test_a_lost_claim_is_taken_again(
    make: Make,
    pg_url: str,
    pg_server: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mxspool.nodename")
    monkeypatch.setattr(nodename, "CLAIM_WAIT", 5.0)
    claim = await _claimed_then_cut(make, pg_url, pg_server, "mx-lost.example.net")
    holding = asyncio.ensure_future(claim.hold(interval=0.1))
    try:
        await eventually(
            lambda: _backend_of(pg_server, "mx-lost.example.net") is not None,
            within=10,
            what="the claim taken again",
        )
        await eventually(lambda: "is this node's again" in caplog.text, what="hold going on")
        assert not holding.done()  # still holding, no error
        with pytest.raises(NodeNameTaken):  # and it is held again
            await make(pg_url, "mx-lost.example.net").claim(wait=0)
    finally:
        holding.cancel()
        await asyncio.gather(holding, return_exceptions=True)


async def test_a_claim_taken_by_another_node_while_lost_stops_this_one(
    make: Make, pg_url: str, pg_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nodename, "CLAIM_WAIT", 0.5)
    claim = await _claimed_then_cut(make, pg_url, pg_server, "mx-twin.example.net")
    twin = make(pg_url, "mx-twin.example.net")
    await twin.claim(wait=5)  # the twin started while the first node's claim was lost
    with pytest.raises(NodeNameTaken) as stopped:
        await asyncio.wait_for(claim.hold(interval=0.1), 10)
    assert "another node named 'mx-twin.example.net'" in str(stopped.value)


async def test_an_unreachable_server_is_a_store_error(make: Make) -> None:
    claim = make("postgresql://nobody@127.0.0.1:9/nothing?connect_timeout=1", "mx1.example.net")
    with pytest.raises(
        StoreError, match=r"cannot claim the node name 'mx1\.example\.net'"
    ) as failed:
        await claim.claim(wait=0)
    assert not isinstance(failed.value, NodeNameTaken)


async def test_serve_stops_before_listening_under_a_running_node_name(
    make: Make, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nodename, "CLAIM_WAIT", 0.5)
    monkeypatch.setattr(service, "extra_components", [])
    await make(pg_url, "mx1.example.net").claim()
    port = free_port()

    def config(name: str) -> Config:
        return Config(
            smtp=SmtpConfig(hostname=name, listen=[f"127.0.0.1:{port}"]),
            store=StoreConfig(url=pg_url, min_free_space=0),
        )

    with pytest.raises(NodeNameTaken):  # serve() logs it and exits with status 1
        await service.run(config("mx1.example.net"))
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    # The control: under a name of its own the same node serves.
    ready = asyncio.Event()
    running = asyncio.ensure_future(service.run(config("mx2.example.net"), ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_the_mark_of_a_running_node_stays_its_own(make: Make, pg_url: str) -> None:
    """Only a name no running node holds is taken over (``Store.adopt_unjudged``)."""
    store = PostgresStore(pg_url)
    await store.open()
    try:
        await store.mark_unjudged("mx1.example.net")
        await store.mark_unjudged("mx2.example.net")
        running = make(pg_url, "mx1.example.net")
        await running.claim()
        assert await store.adopt_unjudged("mx2.example.net") == []
        # The control: once mx1 is gone, its mark is taken over (PostgreSQL drops the lock as
        # the backend of the closed connection exits, a moment after the close).
        await running.close()
        adopted = await eventually(
            lambda: store.adopt_unjudged("mx2.example.net"), what="mx1's mark taken over"
        )
        assert adopted == ["mx1.example.net"]
        assert await store.adopt_unjudged("mx2.example.net") == []
    finally:
        await store.close()
