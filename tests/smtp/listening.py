"""The intake served in the test's own process on a loopback port, over a real SQLite store
that holds one domain, example.test (held)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from mxspool.config import SmtpConfig
from mxspool.intake.domains import DomainTable
from mxspool.intake.listener import Intake
from mxspool.intake.ptr import ReverseNames
from mxspool.store.base import Domain, DomainMode, Route
from mxspool.store.sqlite import SqliteStore


class Listening:
    def __init__(self, intake: Intake, store: SqliteStore, server: asyncio.Server) -> None:
        self.intake = intake
        self.store = store
        self.port: int = server.sockets[0].getsockname()[1]


@contextlib.asynccontextmanager
async def listening_intake(tmp_path: Path, config: SmtpConfig) -> AsyncIterator[Listening]:
    store = SqliteStore(f"sqlite:///{tmp_path / 'spool.db'}")
    await store.open()
    await store.add_domain(Domain("example.test", DomainMode.HOLD, (Route("127.0.0.1", 2526),)))
    domains = DomainTable()
    await domains.refresh(store)
    intake = Intake(
        config,
        store,
        domains,
        min_free_space=0,
        spill_dir=str(tmp_path),
        auth=None,
        names=ReverseNames(),
    )
    server = await asyncio.get_running_loop().create_server(intake.protocol_factory, "127.0.0.1", 0)
    try:
        yield Listening(intake, store, server)
    finally:
        server.close()
        intake.close_all()
        await server.wait_closed()
        await store.close()
