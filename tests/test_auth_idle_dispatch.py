"""Authentication at arrival without costing the intake: on a SQLite store the verification
worker reads the committed message itself, by id (``authwork.read_stored``: no message byte
through the intake), and jobs wait while messages keep arriving (``WorkerPool.arrived``), going
to the workers once the intake pauses, or after ``hold_max`` at most."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mxspool.intake import authpool, authwork
from mxspool.intake.auth import Authenticator
from mxspool.store.sqlite import SqliteStore
from tests.delivery.dnsserver import DnsServer
from tests.e2e.authkit import message
from tests.test_authentication import KEY, dns, incoming, verdict_of

__all__ = ["dns"]  # the fixture, used by name

PASS = "dkim=pass header.d=signed.test header.s=sel"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(f"sqlite:///{tmp_path / 'spool.db'}")
    await opened.open()
    yield opened
    await opened.close()


class OtherStore:
    """The same store seen as not SQLite (as PostgreSQL is): the intake sends the bytes."""

    def __init__(self, inner: SqliteStore) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def spy(auth: Authenticator) -> list[authwork.Job]:
    """The jobs ``auth`` sends to its workers, from now on."""
    jobs: list[authwork.Job] = []
    submit = auth.pool.submit

    def recording(batch: list[authwork.Job]) -> Any:
        jobs.extend(batch)
        return submit(batch)

    auth.pool.submit = recording  # type: ignore[method-assign,assignment]
    return jobs


@pytest.mark.parametrize("kind", ["sqlite", "other"])
async def test_the_worker_reads_a_sqlite_message_itself(
    store: SqliteStore, dns: DnsServer, kind: str
) -> None:
    seen: Any = store if kind == "sqlite" else OtherStore(store)
    auth = Authenticator(seen, authserv_id="mx.test", resolver=dns.address, timeout=3.0)
    jobs = spy(auth)
    try:
        signed = KEY.sign(message("a@signed.test", body="y" * 150_000 + "\r\n"), "signed.test")
        items = [incoming(signed), incoming(signed, spill_threshold=1024)]
        for item in items:
            await store.accept_message(item)
            auth.submit(item, None)
        for item in items:
            assert PASS in ((await verdict_of(store, item.id)).auth_results or "")
        assert len(jobs) == 2
        if kind == "sqlite":  # ids only: not a byte through the intake
            assert [(j.data, j.path, j.message_id) for j in jobs] == [
                (None, None, item.id) for item in items
            ]
            assert {j.database for j in jobs} == {str(store.path)}
        else:  # the control: the bytes, and the spill file (in either order: both resolve DNS)
            assert sorted((j.data == signed, bool(j.path), j.message_id) for j in jobs) == [
                (False, True, ""),
                (True, False, ""),
            ]
    finally:
        auth.close()
        await auth.drain()


async def test_a_burst_is_accepted_before_its_messages_go_to_a_worker(
    store: SqliteStore, dns: DnsServer
) -> None:
    auth = Authenticator(store, authserv_id="mx.test", resolver=dns.address, timeout=3.0)
    jobs = spy(auth)
    try:
        item = incoming(KEY.sign(message("a@signed.test"), "signed.test"))
        await store.accept_message(item)
        auth.submit(item, None)
        await _arriving(auth.pool, 0.5, asyncio.get_running_loop().create_future())
        assert jobs == [], "sent to a worker while messages kept arriving"
        assert PASS in ((await verdict_of(store, item.id)).auth_results or "")  # the control
        assert [j.message_id for j in jobs] == [item.id]
    finally:
        auth.close()
        await auth.drain()


async def test_read_stored_and_a_message_gone(store: SqliteStore, dns: DnsServer) -> None:
    signed = KEY.sign(message("a@signed.test"), "signed.test")
    item = incoming(signed)
    await store.accept_message(item)
    assert authwork.read_stored(str(store.path), item.id) == signed
    assert authwork.read_stored(str(store.path), "Anothere") is None
    authwork._settings["nameserver"] = dns.address
    job = authwork.Job(None, None, len(signed), {}, 3.0, item.id, str(store.path))
    assert [r.result for r in authwork.verify(job).dkim] == ["pass"]
    gone = authwork.verify(authwork.Job(None, None, 1, {}, 3.0, "Anothere", str(store.path)))
    assert [(r.result, r.reason) for r in gone.dkim] == [("temperror", "message gone")]


ARRIVAL_GAP = 0.005
"""Seconds between the simulated arrivals (well under ``authpool.IDLE_GAP``)."""


async def _arriving(pool: authpool.WorkerPool, seconds: float, until: asyncio.Future[Any]) -> None:
    """Messages keep arriving (a timer calls ``arrived`` every ARRIVAL_GAP, as the intake's
    sessions would) until ``until`` is done, waiting for that at most ``seconds``."""
    loop = asyncio.get_running_loop()
    timer: list[asyncio.TimerHandle] = []

    def arrive() -> None:
        if not until.done():
            pool.arrived()
            timer[:] = [loop.call_later(ARRIVAL_GAP, arrive)]

    arrive()
    try:
        await asyncio.wait([until], timeout=seconds)
    finally:
        for handle in timer:
            handle.cancel()


async def test_jobs_wait_while_messages_arrive(dns: DnsServer) -> None:
    pool = authpool.WorkerPool(1, nameserver=dns.address)
    try:
        await pool.warm()
        signed = KEY.sign(message("a@signed.test"), "signed.test")
        pool.arrived()  # as the intake does for each message, before its job
        (future,) = pool.submit([authwork.Job(signed, None, len(signed), {}, 3.0)])
        await _arriving(pool, 0.5, future)
        assert not future.done(), "verified while messages kept arriving"
        paused = time.monotonic()
        outcome = await asyncio.wait_for(future, 10)  # the control: right after the pause
        assert [r.result for r in outcome.dkim] == ["pass"]
        assert time.monotonic() - paused < 5
    finally:
        pool.close()
        await pool.stopped()


async def test_a_job_waits_hold_max_at_most(dns: DnsServer) -> None:
    pool = authpool.WorkerPool(1, nameserver=dns.address, hold_max=0.3)
    try:
        await pool.warm()
        signed = KEY.sign(message("a@signed.test"), "signed.test")
        started = time.monotonic()
        pool.arrived()
        (future,) = pool.submit([authwork.Job(signed, None, len(signed), {}, 3.0)])
        await _arriving(pool, 10, future)  # arrivals never pause
        assert future.done(), "never verified under a steady arrival of messages"
        assert 0.3 <= time.monotonic() - started < 10
        assert [r.result for r in future.result().dkim] == ["pass"]
    finally:
        pool.close()
        await pool.stopped()
