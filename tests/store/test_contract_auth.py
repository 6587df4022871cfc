"""The store contract of authentication at arrival, on every backend: ``set_authentication``
stores the Authentication-Results value and its time beside the message (never in its bytes)
and merges the spf=/dkim=/dmarc= tags; ``unauthenticated`` and ``without_authentication``
find messages still without a verdict."""

from __future__ import annotations

import time

import pytest

from mxspool.store import queries
from mxspool.store.base import NotFound, Store
from tests.store.test_contract import put, read_all

VALUE = (
    "mx.test; spf=pass smtp.mailfrom=sender@src.test; dkim=pass header.d=src.test "
    "header.s=sel; dmarc=pass header.from=src.test policy.dmarc=reject"
)


async def test_set_authentication_stores_value_time_and_tags(store: Store) -> None:
    queue_id = await put(store, ["a@relay.test"], data=b"Subject: x\r\n\r\nhi\r\n")
    fresh = await store.get_message(queue_id)
    assert fresh is not None and fresh.auth_results is None and fresh.auth_at is None
    await store.add_tag(queue_id, "probe")

    before = time.time()
    await store.set_authentication(queue_id, VALUE, ("spf=pass", "dkim=pass", "dmarc=pass"))
    message = await store.get_message(queue_id)
    assert message is not None
    assert message.auth_results == VALUE
    assert message.auth_at is not None and before - 1 <= message.auth_at <= time.time() + 1
    assert message.tags == ("probe", "spf=pass", "dkim=pass", "dmarc=pass")
    assert await read_all(store, queue_id) == b"Subject: x\r\n\r\nhi\r\n"  # bytes untouched

    # A new verdict (recomputed after a crash) replaces the tags of the same name.
    await store.set_authentication(queue_id, "mx.test; none", ("dkim=none", "dmarc=temperror"))
    again = await store.get_message(queue_id)
    assert again is not None and again.auth_results == "mx.test; none"
    assert again.tags == ("probe", "spf=pass", "dkim=none", "dmarc=temperror")

    with pytest.raises(NotFound):
        await store.set_authentication("NOSUCHID", VALUE, ())


async def test_messages_without_a_verdict_are_found(store: Store) -> None:
    old = await put(store, ["a@relay.test"], received_at=time.time() - 60)
    judged = await put(store, ["a@relay.test"], received_at=time.time() - 60)
    new = await put(store, ["a@relay.test"])
    await store.set_authentication(judged, VALUE, ("dkim=none",))

    assert await store.unauthenticated([old, judged, new, "NOSUCHID"]) == {old, new}
    assert await store.unauthenticated([]) == set()
    # Received before the cut-off and still without a verdict; oldest first; limited.
    assert await store.without_authentication(time.time() - 30, 10) == [old]
    assert await store.without_authentication(time.time() + 1, 10) == [old, new]
    assert await store.without_authentication(time.time() + 1, 1) == [old]


async def test_since_looks_back_past_the_recent_window(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queries, "RECENT_SCAN", 3)
    left = await put(store, ["a@relay.test"])  # the intake left it to the background pass
    newer = [await put(store, ["a@relay.test"]) for _ in range(4)]
    for queue_id in newer[:3]:
        await store.set_authentication(queue_id, VALUE, ("dkim=none",))
    # The control: out of the newest three, so the window alone no longer finds it.
    assert await store.without_authentication(time.time() + 1, 10) == [newer[3]]
    # Back to ``since``: found again, oldest first, as are the newer ones still unjudged.
    assert await store.without_authentication(time.time() + 1, 10, left) == [left, newer[3]]
    assert await store.without_authentication(time.time() + 1, 1, left) == [left]
    # ``since`` newer than the window's start, or gone: the window as before.
    assert await store.without_authentication(time.time() + 1, 10, newer[3]) == [newer[3]]
    assert await store.without_authentication(time.time() + 1, 10, "NOSUCHID") == [newer[3]]


async def test_a_node_mark_reaches_back_past_the_recent_window(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queries, "RECENT_SCAN", 3)
    now = time.time() + 1
    owed = await put(store, ["a@relay.test"])  # mx1 noted it owes its verdict, then died
    await store.mark_unjudged("mx1", [owed, "NOSUCHID"])
    newer = [await put(store, ["a@relay.test"]) for _ in range(4)]
    for queue_id in newer[:3]:
        await store.set_authentication(queue_id, VALUE, ("dkim=none",))
    # The control: the window of the newest three alone misses it, as does another node's view.
    assert await store.without_authentication(now, 10) == [newer[3]]
    assert await store.without_authentication(now, 10, node="mx2") == [newer[3]]
    # From mx1's mark on: found again, oldest first; with ``since`` too, the older floor counts.
    assert await store.without_authentication(now, 10, node="mx1") == [owed, newer[3]]
    assert await store.without_authentication(now, 10, newer[3], "mx1") == [owed, newer[3]]
    # Marking again at a newer message keeps the older mark ...
    await store.mark_unjudged("mx1", [newer[3]])
    assert await store.without_authentication(now, 10, node="mx1") == [owed, newer[3]]
    # ... moving it does not: it now starts at newer[3].
    await store.mark_unjudged("mx1", [newer[3]], move=True)
    assert await store.without_authentication(now, 10, node="mx1") == [newer[3]]
    # Moved back to an older message (the pass found one still owed): reached again.
    await store.mark_unjudged("mx1", [newer[2], owed], move=True)
    assert await store.without_authentication(now, 10, node="mx1") == [owed, newer[3]]
    # Nothing owed: the first of the newest three (what is being committed is in there).
    await store.mark_unjudged("mx1", [], move=True)
    assert await store.without_authentication(now, 10, node="mx1") == [newer[3]]
    await store.mark_unjudged("mx1", ["NOSUCHID"], move=True)  # gone: the same window
    assert await store.without_authentication(now, 10, node="mx1") == [newer[3]]
    # A node with no mark yet gets the window; forgetting a mark leaves the window.
    await store.mark_unjudged("mx2")
    await store.mark_unjudged("mx1", [owed], move=True)
    await store.clear_unjudged("mx1")
    await store.clear_unjudged("mx3")  # none: nothing to do
    assert await store.without_authentication(now, 10, node="mx1") == [newer[3]]
    assert await store.without_authentication(now, 10, node="mx2") == [newer[3]]


async def test_the_mark_of_a_node_that_is_gone_is_taken_over(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One store, so every other name is not running (SQLite: one server per spool); which
    # PostgreSQL nodes run is tests/store/test_nodename.py's.
    monkeypatch.setattr(queries, "RECENT_SCAN", 3)
    now = time.time() + 1
    owed = await put(store, ["a@relay.test"])  # mx1 noted it owes its verdict, then went away
    await store.mark_unjudged("mx1", [owed])
    newer = [await put(store, ["a@relay.test"]) for _ in range(4)]
    for queue_id in newer[:3]:
        await store.set_authentication(queue_id, VALUE, ("dkim=none",))
    await store.mark_unjudged("mx2", [newer[3]])
    # The control: mx2's own mark does not reach back to it.
    assert await store.without_authentication(now, 10, node="mx2") == [newer[3]]
    assert await store.adopt_unjudged("mx2") == ["mx1"]
    assert await store.without_authentication(now, 10, node="mx2") == [owed, newer[3]]
    assert await store.without_authentication(now, 10, node="mx1") == [newer[3]]  # mx1's: gone
    assert await store.adopt_unjudged("mx2") == []  # nothing left to take over
    # A newer mark taken over leaves the older one of its own as it was ...
    await store.mark_unjudged("mx3", [newer[3]])
    assert await store.adopt_unjudged("mx2") == ["mx3"]
    assert await store.without_authentication(now, 10, node="mx2") == [owed, newer[3]]
    # ... and a node without a mark of its own takes the other's as it is.
    assert await store.adopt_unjudged("mx4") == ["mx2"]
    assert await store.without_authentication(now, 10, node="mx4") == [owed, newer[3]]
    assert await store.adopt_unjudged("mx4") == []
