"""Fixtures for delivery tests: a SQLite store in tmp_path, targets, and the engine in-process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mxspool.body import BodyBuffer
from mxspool.delivery.dnscache import DnsCache
from mxspool.delivery.engine import DrainSettings
from mxspool.delivery.outcomes import RetryPolicy
from mxspool.delivery.routing import Router
from mxspool.delivery.scheduler import Scheduler, new_owner_id
from mxspool.delivery.smtpclient import SmtpConnector
from mxspool.delivery.transport import Connector
from mxspool.envelope import Envelope, MailParams, RcptParams, Recipient
from mxspool.ids import new_queue_id
from mxspool.store.base import (
    ClientInfo,
    Domain,
    DomainChanges,
    DomainMode,
    IncomingMessage,
    ReportRow,
    Route,
    TlsMode,
)
from mxspool.store.sqlite import SqliteStore
from tests.delivery.reference_client import AiosmtplibConnector
from tests.delivery.target import Target
from tests.waiting import eventually

DOMAIN = "example.test"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    spool = SqliteStore(f"sqlite:///{tmp_path / 'spool.db'}")
    await spool.open()
    yield spool
    await spool.close()


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target().start()
    yield server
    server.stop()


def message_bytes(number: int, size: int = 600) -> bytes:
    """A message whose body has lines that need dot-stuffing, and a lone "." line."""
    head = (
        f"Received: from client.test by mx.test.local; id {number}\r\n"
        f"From: <sender@src.test>\r\nTo: <user@{DOMAIN}>\r\n"
        f"Subject: message {number}\r\nMessage-ID: <m{number}@src.test>\r\n\r\n"
    ).encode()
    body = b".starts with a dot\r\n.\r\n..two dots\r\nend.\r\n"
    filler = b""
    while len(head) + len(body) + len(filler) < size:
        filler += b"x" * 70 + b"\r\n"
    return head + filler + body


async def put_message(
    store: SqliteStore,
    recipients: list[str],
    data: bytes | None = None,
    mail_from: str = "sender@src.test",
    params: MailParams | None = None,
    rcpt_params: RcptParams | None = None,
) -> tuple[str, bytes]:
    """Store one message as the intake would; (queue id, bytes)."""
    queue_id = new_queue_id()
    data = data if data is not None else message_bytes(len(queue_id))
    body = BodyBuffer(1 << 20)
    body.write(data)
    envelope = Envelope(
        mail_from,
        params or MailParams(size=len(data)),
        tuple(Recipient(address, rcpt_params or RcptParams()) for address in recipients),
    )
    await store.accept_message(
        IncomingMessage(
            id=queue_id,
            envelope=envelope,
            client=ClientInfo("127.0.0.1", "client.test"),
            received_at=time.time(),
            message_id=None,
            body=body,
        )
    )
    return queue_id, data


async def add_domain(
    store: SqliteStore,
    port: int,
    *,
    name: str = DOMAIN,
    hold: bool = True,
    tls: TlsMode = TlsMode.OFF,
    rate: float | None = None,
    routes: tuple[Route, ...] | None = None,
    use_mx: bool = False,
    profile: str | None = None,
) -> None:
    await store.add_domain(
        Domain(
            name=name,
            mode=DomainMode.HOLD if hold else DomainMode.RELAY,
            routes=routes if routes is not None else (Route("127.0.0.1", port),),
            use_mx=use_mx,
            tls=tls,
            rate=rate,
            profile=profile,
        )
    )


async def release(store: SqliteStore, name: str = DOMAIN) -> None:
    await store.update_domain(name, DomainChanges(mode=DomainMode.RELAY, released_at=time.time()))


async def rows(store: SqliteStore) -> list[ReportRow]:
    """The report's rows, without the positive controls' mail (see ``delivered_control``)."""
    return [row async for row in store.report() if not row.rcpt.endswith(f"@{CONTROL}")]


async def states(store: SqliteStore) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in await rows(store):
        counts[row.state] = counts.get(row.state, 0) + 1
    return counts


async def wait_for(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool], within: float = 15.0
) -> None:
    await eventually(check, within)


CONTROL = "control.test"
"""A relay domain routed to the ``control`` target: the positive control of "nothing happened"."""


@pytest.fixture
def control() -> Iterator[Target]:
    """A second target, for ``delivered_control``."""
    server = Target().start()
    yield server
    server.stop()


async def delivered_control(store: SqliteStore, control: Target, within: float = 15.0) -> None:
    """Positive control for "nothing happened" checks: put a message for a relay domain routed
    to ``control`` and wait until the running engine delivered it. Once this returns, the engine
    has polled, claimed and sent since the call, so mail it should have left alone but did not
    leave alone would have gone too."""
    if await store.get_domain(CONTROL) is None:
        await add_domain(store, control.port, name=CONTROL, hold=False)
    before = len(control.recorder.received)
    await put_message(store, [f"c{before}@{CONTROL}"])
    await eventually(lambda: len(control.recorder.received) > before, within, "the control mail")


EngineFactory = Callable[..., Scheduler]

CLIENTS = ("own", "aiosmtplib")
"""Transport implementations: our client (the default) and aiosmtplib (the test-only reference,
``tests/delivery/reference_client``)."""


@pytest.fixture
def client() -> str:
    """Which transport the engine uses; modules that test the wire parametrize this over
    ``CLIENTS`` (see test_faults), the rest use the default."""
    return "own"


def make_connector(client: str, ca_file: str = "", helo: str = "mx.test.local") -> Connector:
    factory = SmtpConnector if client == "own" else AiosmtplibConnector
    return factory(local_hostname=helo, connect_timeout=5.0, ca_file=ca_file)


@pytest.fixture
async def engine(store: SqliteStore, client: str) -> AsyncIterator[EngineFactory]:
    """Start the delivery engine in this loop: ``engine(concurrency=2, rate=20, ...)``."""
    tasks: list[asyncio.Task[None]] = []

    def start(
        *,
        on: Any = None,
        concurrency: int = 4,
        rate: float = 0.0,
        retry: tuple[float, ...] = (0.2,),
        max_age: float = 3600.0,
        resolver: str = "",
        ca_file: str = "",
        lease: float = 30.0,
        owner: str | None = None,
        shared_pacing: bool = False,
        helo: str = "mx.test.local",
        claim_limit: int = 200,
    ) -> Scheduler:
        scheduler = Scheduler(
            on or store,
            Router(DnsCache(resolver)),
            make_connector(client, ca_file, helo),
            DrainSettings(
                owner=owner or new_owner_id(),
                concurrency=concurrency,
                default_rate=rate,
                policy=RetryPolicy(retry, max_age),
                lease_seconds=lease,
                shared_pacing=shared_pacing,
                claim_limit=claim_limit,
            ),
            poll_interval=0.1,
        )
        tasks.append(asyncio.create_task(scheduler.run()))
        return scheduler

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
