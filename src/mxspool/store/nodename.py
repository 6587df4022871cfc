"""A PostgreSQL node's claim on its name: two running nodes of one spool never share one.

Several nodes share a PostgreSQL spool, and each is known by its ``[smtp] hostname``. The store
keeps under that name the mark of the verdicts the node may still owe (``Store.mark_unjudged``,
``intake.auth``), and the cluster's notifications tell nodes apart by it (``store.presence``).
Two nodes with one name would move and clear each other's mark: after one of them crashed, its
recovery would not reach back to what it owed, and held mail could be released days later
without its arrival verdict. docs/multi-node.md asks for a name per node; this makes sure.

``serve`` claims its name once its store is open, before it opens the listeners: a session
advisory lock keyed by the database, the schema and the name (so spools sharing a server stay
apart), taken on a connection of its own that it keeps for its life. Nothing is written.

- A second node with the same name waits up to ``CLAIM_WAIT`` seconds, then refuses to start,
  naming the address that holds the name (``NodeNameTaken``, exit status 1).
- The lock goes with its connection. A node killed outright loses it at once (the kernel closes
  its socket). A node whose host died keeps it until PostgreSQL notices: this connection sets
  the server's TCP keepalives to a few seconds (``KEEPALIVE``), so that is well inside the wait.
- ``hold`` looks at the connection every ``CHECK_INTERVAL`` seconds. When it is lost (a
  PostgreSQL restart, the network), the node takes its name again as at the start, once
  PostgreSQL answers; if another node holds it after ``CLAIM_WAIT``, ``hold`` raises
  NodeNameTaken and the node stops with exit status 1 (``service._guard``), so its service
  manager starts it again, to wait for its name as at any start.

A name no running node holds is how the other nodes know a node is gone: they take over its
mark (``Store.adopt_unjudged``, under the name's lock for that one transaction), so what a node
that never comes back owed is judged all the same.

SQLite spools need none of this: one server per spool file (``store.serverlock``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from mxspool.store.base import StoreError
from mxspool.store.presence import close_quietly

log = logging.getLogger("mxspool.nodename")

CLAIM_WAIT = 30.0
"""Seconds a starting node waits for its name to be free."""
RETRY = 0.5
"""Seconds between tries while the name is held, or PostgreSQL does not answer."""
CHECK_INTERVAL = 10.0
"""Seconds between looks at the claim's connection."""
KEEPALIVE = (
    ("tcp_keepalives_idle", 5),
    ("tcp_keepalives_interval", 2),
    ("tcp_keepalives_count", 3),
)
"""The server side's TCP keepalives on this connection: a dead host's claim goes in ~11 s."""

_KEY = (
    "hashtextextended('mxspool-node:' || current_database() || '/' || current_schema()"
    " || ':' || %s, 0)"
)
_LOCK_SQL = f"SELECT pg_try_advisory_lock({_KEY})"
NAME_FREE_SQL = f"SELECT pg_try_advisory_xact_lock({_KEY})"
"""True when no running node holds the name; the name is then the transaction's till it ends
(``PostgresStore.adopt_unjudged``)."""
# pg_locks shows a bigint advisory key as its high and low 32 bits (classid, objid).
HOLDER_SQL = (
    f"WITH k AS (SELECT {_KEY} AS key)"
    " SELECT coalesce(host(a.client_addr), 'a local socket'), a.backend_start"
    " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid, k"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
    " AND l.classid::text::bigint = (k.key >> 32) & 4294967295"
    " AND l.objid::text::bigint = k.key & 4294967295"
)


def holder_text(row: tuple[Any, ...]) -> str:
    """A row of ``HOLDER_SQL`` (the name's holder: its address and since when) for a message."""
    return f"{row[0]}, since {row[1]:%Y-%m-%d %H:%M:%S %Z}"


class NodeNameTaken(StoreError):
    """Another running node of this spool has this node's name."""


class NodeName:
    """One node's claim on its name (see the module docstring)."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self._conn: Any = None

    async def claim(self, wait: float | None = None) -> None:
        """Take the name, waiting up to ``wait`` seconds (``CLAIM_WAIT``) while another
        connection holds it. Raises NodeNameTaken (held all along) or StoreError (PostgreSQL
        did not answer)."""
        import psycopg

        wait = CLAIM_WAIT if wait is None else wait
        deadline = time.monotonic() + wait
        told = False
        while True:
            try:
                holder = await self._try()
            except psycopg.Error as exc:
                await self.close()
                if time.monotonic() >= deadline:
                    raise StoreError(
                        f"cannot claim the node name {self.name!r} in PostgreSQL: {exc}"
                    ) from exc
            else:
                if holder is None:
                    return
                if time.monotonic() >= deadline:
                    raise NodeNameTaken(
                        f"another node named {self.name!r} is serving this spool (its "
                        f"connection from {holder}); give each node its own [smtp] hostname "
                        "(docs/multi-node.md), or stop the other one first"
                    )
                if not told:
                    log.warning(
                        "the node name %r is held by a connection from %s; waiting up to %gs "
                        "for it (a node that just stopped lets go of it within seconds)",
                        self.name,
                        holder,
                        wait,
                    )
                    told = True
            await asyncio.sleep(min(RETRY, max(0.0, deadline - time.monotonic())))

    async def _try(self) -> str | None:
        """One try: None once this connection holds the name, else who holds it."""
        if self._conn is None or self._conn.closed:
            self._conn = await self._connect()
        row = await (await self._conn.execute(_LOCK_SQL, (self.name,))).fetchone()
        if row is not None and row[0]:
            return None
        found = await (await self._conn.execute(HOLDER_SQL, (self.name,))).fetchone()
        if found is None:  # let go between the two statements: try again
            return "a connection that just closed"
        return holder_text(found)

    async def _connect(self) -> Any:
        import psycopg

        conn = await psycopg.AsyncConnection.connect(
            self.url,
            autocommit=True,
            application_name=f"mxspool node {self.name}"[:63],
            connect_timeout=10,
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
        )
        try:
            for setting, value in KEEPALIVE:
                await conn.execute(f"SET {setting} = {int(value)}")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def hold(self, interval: float = CHECK_INTERVAL) -> None:
        """Keep the name until cancelled, retaking it after a lost connection (as ``claim``
        does at the start); raises NodeNameTaken when another node took it meanwhile."""
        import psycopg

        while True:
            await asyncio.sleep(interval)
            if self._conn is not None and not self._conn.closed:
                try:
                    await self._conn.execute("SELECT 1")
                    continue
                except psycopg.Error:
                    pass
            await self.close()
            log.warning("lost the connection holding the node name %r; taking it again", self.name)
            while True:
                try:
                    await self.claim()
                    break
                except NodeNameTaken:
                    raise
                except StoreError as exc:  # PostgreSQL is away: so is the rest of the node
                    log.warning("%s; trying again", exc)
            log.info("the node name %r is this node's again", self.name)

    async def close(self) -> None:
        """Let go of the name (closing the connection drops the lock)."""
        conn, self._conn = self._conn, None
        await close_quietly(conn, "node-name")
