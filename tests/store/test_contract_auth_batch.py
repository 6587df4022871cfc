"""The batched verdict write of authentication at arrival, on every backend:
``set_authentications`` stores many verdicts in one transaction, merges each message's tags like
``set_authentication``, and reports (skips) ids that are gone instead of failing the batch."""

from __future__ import annotations

import time

from mxspool.store.base import Store
from tests.store.test_contract import put


async def test_set_authentications_stores_each_verdict_and_reports_missing_ids(
    store: Store,
) -> None:
    ids = [await put(store, ["a@relay.test"], data=b"Subject: x\r\n\r\nhi\r\n") for _ in range(3)]
    await store.add_tag(ids[0], "probe")
    await store.add_tag(ids[1], "spf=temperror")
    before = time.time()

    missing = await store.set_authentications(
        [
            (ids[0], "mx.test; dkim=pass", ("dkim=pass", "dmarc=pass")),
            ("NOSUCHID", "mx.test; dkim=none", ("dkim=none",)),
            (ids[1], "mx.test; spf=pass", ("spf=pass", "dkim=none", "dmarc=none")),
        ]
    )

    assert missing == ["NOSUCHID"]
    first, second, untouched = [await store.get_message(mid) for mid in ids]
    assert first is not None and second is not None and untouched is not None
    assert first.auth_results == "mx.test; dkim=pass"
    assert first.auth_at is not None and first.auth_at >= before - 1
    assert set(first.tags) == {"probe", "dkim=pass", "dmarc=pass"}
    assert second.auth_results == "mx.test; spf=pass"
    assert set(second.tags) == {"spf=pass", "dkim=none", "dmarc=none"}  # temperror replaced
    assert untouched.auth_results is None and untouched.auth_at is None  # not in the batch
    assert await store.unauthenticated(ids) == {ids[2]}


async def test_set_authentications_of_nothing_is_a_no_op(store: Store) -> None:
    queue_id = await put(store, ["a@relay.test"])
    assert await store.set_authentications([]) == []
    assert await store.unauthenticated([queue_id]) == {queue_id}
