"""The verification worker reads a committed message from a PostgreSQL store by its id, over its
own connection (``authwork.read_stored``), as it does from a SQLite file: no message byte goes
through the intake on either store."""

from __future__ import annotations

import asyncio
from typing import Any

from mxspool.intake import auth, authwork
from mxspool.intake.auth import Authenticator
from mxspool.store.postgres import PostgresStore
from tests.delivery.dnsserver import DnsServer
from tests.e2e.authkit import message
from tests.store.test_contract import make_message
from tests.test_authentication import KEY, dns, incoming, verdict_of

__all__ = ["dns"]  # the fixture, used by name

PASS = "dkim=pass header.d=signed.test header.s=sel"


def test_the_worker_reads_a_postgres_message_by_id(pg_url: str) -> None:
    data = b"Subject: chunks\r\n\r\n" + b"x" * 300_000 + b"\r\n"  # several body chunks

    async def fill() -> tuple[str, str]:
        store = PostgresStore(pg_url)
        await store.open()
        try:
            message = make_message(["u@relay.test"], data)
            await store.accept_message(message)
            stored = b"".join([piece async for piece in store.read_body(message.id)])
            assert auth._readable_by_workers(store) == pg_url  # ids go, not bytes
            return message.id, stored.decode("latin-1")
        finally:
            await store.close()

    message_id, stored = asyncio.run(fill())
    try:
        assert authwork.read_stored(pg_url, message_id) == stored.encode("latin-1")
        assert authwork.read_stored(pg_url, "NoSuchId") is None  # control: gone is None
    finally:
        authwork._forget(pg_url)


async def test_verdicts_on_postgres_come_from_ids_only(pg_url: str, dns: DnsServer) -> None:
    store = PostgresStore(pg_url)
    await store.open()
    authenticator = Authenticator(store, authserv_id="mx.test", resolver=dns.address, timeout=3.0)
    jobs: list[authwork.Job] = []
    submit = authenticator.pool.submit

    def recording(batch: list[authwork.Job]) -> Any:
        jobs.extend(batch)
        return submit(batch)

    authenticator.pool.submit = recording  # type: ignore[method-assign,assignment]
    try:
        signed = KEY.sign(message("a@signed.test", body="y" * 150_000 + "\r\n"), "signed.test")
        items = [incoming(signed), incoming(signed, spill_threshold=1024)]
        for item in items:
            await store.accept_message(item)
            authenticator.submit(item, None)
        for item in items:  # the verdict is real: the worker read the right bytes
            assert PASS in ((await verdict_of(store, item.id)).auth_results or "")
        assert [(j.data, j.path, j.message_id, j.database) for j in jobs] == [
            (None, None, item.id, pg_url) for item in items
        ]
    finally:
        authenticator.close()
        await authenticator.drain()
        await store.close()
