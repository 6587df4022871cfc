"""Which nodes of a PostgreSQL cluster are alive, and which one of them speaks for the cluster.

Used by the notifications (mxspool.notify) and nothing else; it needs no table. Each serving
node keeps one extra connection open whose ``application_name`` is ``mxn:<spool>:<node>``
(``<spool>``: a short hash of database and schema, so spools sharing a server stay apart).
``pg_stat_activity`` lists every live connection, so the set of such names is the set of
nodes connected now; a node that crashed, hung up or lost its network disappears from it once
PostgreSQL notices (TCP keepalives, at most about half a minute).

The same connection takes a session advisory lock, ``pg_try_advisory_lock``: the node that
holds it is the leader, the only one that sends notifications, so each is sent once. The lock
goes with the connection, so when the leader dies another node takes it at its next try.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

log = logging.getLogger("mxspool.presence")

PREFIX = "mxn:"
_NAME_LIMIT = 63
"""PostgreSQL keeps this many bytes of application_name (NAMEDATALEN - 1)."""
_SPOOL_SQL = "SELECT current_database(), current_schema()"
_LOCK_SQL = "SELECT pg_try_advisory_lock(hashtextextended('mxspool-notify:' || %s, 0))"
_SEEN_SQL = (
    "SELECT DISTINCT application_name FROM pg_stat_activity"
    " WHERE datname = current_database() AND application_name LIKE %s"
)


class Presence:
    """One node's presence connection (see the module docstring)."""

    def __init__(self, url: str, node: str) -> None:
        self.url = url
        self.node = node
        self._conn: Any = None
        self._spool = ""
        self.leader = False

    async def _connect(self) -> Any:
        import psycopg

        probe = await psycopg.AsyncConnection.connect(self.url, autocommit=True, connect_timeout=10)
        try:
            row = await (await probe.execute(_SPOOL_SQL)).fetchone()
        finally:
            await probe.close()
        if row is None:
            raise psycopg.OperationalError("no current database or schema")
        spool = hashlib.sha256(f"{row[0]}/{row[1]}".encode()).hexdigest()[:8]
        name = f"{PREFIX}{spool}:{self.node}".encode()[:_NAME_LIMIT].decode("utf-8", "ignore")
        conn = await psycopg.AsyncConnection.connect(
            self.url,
            autocommit=True,
            application_name=name,
            connect_timeout=10,
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )
        self._spool = spool
        return conn

    async def lead(self) -> bool:
        """Whether this node is the leader now (takes the lock when free); False on errors."""
        import psycopg

        try:
            if self._conn is None or self._conn.closed:
                self.leader = False
                self._conn = await self._connect()
            if not self.leader:
                row = await (await self._conn.execute(_LOCK_SQL, (self._spool,))).fetchone()
                self.leader = bool(row and row[0])
                if self.leader:
                    log.info("this node (%s) now sends the cluster's notifications", self.node)
            else:
                await self._conn.execute("SELECT 1")  # still connected, so still the leader
        except psycopg.Error as exc:
            log.warning("presence connection to PostgreSQL failed: %s; retrying", exc)
            await self.close()
        return self.leader

    async def seen(self) -> set[str]:
        """The names of the nodes connected to this spool now (this one included)."""
        if self._conn is None:
            return set()
        prefix = f"{PREFIX}{self._spool}:"
        cursor = await self._conn.execute(_SEEN_SQL, (prefix.replace("_", r"\_") + "%",))
        return {str(row[0])[len(prefix) :] for row in await cursor.fetchall()}

    async def close(self) -> None:
        self.leader = False
        conn, self._conn = self._conn, None
        await close_quietly(conn, "presence")


async def close_quietly(conn: Any, what: str) -> None:
    """Close a node's held connection (None: nothing to do); a failure is only logged, since
    the connection is being given up anyway (and a lock it held goes with it)."""
    if conn is None:
        return
    try:
        await conn.close()
    except Exception:
        log.debug("closing the %s connection failed", what, exc_info=True)
