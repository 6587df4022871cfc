"""Node presence on PostgreSQL (mxspool.store.presence): one leader per spool, the others take
over when it goes, and a node that disappears is reported as node_lost after the timeout."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from mxspool.notify.nodes import NodeWatch
from mxspool.store.presence import Presence
from tests.waiting import eventually


@pytest.fixture
async def nodes(pg_url: str) -> AsyncIterator[list[Presence]]:
    made = [Presence(pg_url, "node-a"), Presence(pg_url, "node-b")]
    yield made
    for node in made:
        await node.close()


async def test_one_leader_takeover_and_node_lost(
    nodes: list[Presence], pg_url: str, pg_server: str
) -> None:
    a, b = nodes
    assert await a.lead() is True
    assert await b.lead() is False, "the lock is held by node-a"
    assert await a.lead() is True, "the leader keeps leading"
    assert await a.seen() == {"node-a", "node-b"}
    # Another spool (schema) on the same server is not this spool's node, nor its leader.
    other = Presence(pg_server, "elsewhere")
    try:
        assert await other.lead() is True
        assert "elsewhere" not in await a.seen()
    finally:
        await other.close()

    watch = NodeWatch("node-b", timeout=0.5)
    await a.close()  # node-a dies: its connection and its lock go
    assert await eventually(b.lead, 10, "node-b taking over")
    watch.observe({"node-a", "node-b"}, time.time())
    assert await b.seen() == {"node-b"}
    lost = await eventually(
        lambda: watch.observe(["node-b"], time.time()), 5, "node-a reported lost"
    )
    assert [e.details["lost_node"] for e in lost] == ["node-a"]
    assert lost[0].event == "node_lost"
