"""Store contract: the sha256 of the bytes that left, recorded with a delivered outcome, and the
report row's sent digest and arrival verdict tags (every backend)."""

from __future__ import annotations

import hashlib

from mxspool.store.base import RecipientOutcome, RecipientState, ReportRow, Store
from tests.store.test_contract import RELAY, add_domain, claim, put

SENT = hashlib.sha256(b"ARC-Seal: ...\r\nthe stored bytes").hexdigest()


async def report(store: Store) -> dict[str, ReportRow]:
    return {row.rcpt: row async for row in store.report()}


async def test_delivered_outcome_records_the_sent_digest_only_for_that_recipient(
    store: Store,
) -> None:
    await add_domain(store, RELAY)
    message_id = await put(store, [f"a@{RELAY}", f"b@{RELAY}", f"c@{RELAY}"])
    await store.set_authentication(
        message_id, "mx.test; spf=pass smtp.mailfrom=src.test", ["spf=pass", "dkim=none"]
    )
    (job,) = await claim(store, RELAY)
    a, b, c = job.recipients
    await store.record_outcomes(
        "node-a",
        [
            RecipientOutcome(a.id, RecipientState.DELIVERED, "250 ok", "t", sent_sha256=SENT),
            RecipientOutcome(b.id, RecipientState.PENDING, "451 later", "t", next_attempt_at=1e12),
            RecipientOutcome(c.id, RecipientState.DELIVERED, "250 ok", "t"),
        ],
    )
    rows = await report(store)
    stored = (await store.get_message(message_id)).sha256  # type: ignore[union-attr]
    assert rows[f"a@{RELAY}"].state == "delivered"
    assert rows[f"a@{RELAY}"].sent_sha256 == SENT != stored
    assert rows[f"a@{RELAY}"].sha256 == stored  # the stored digest is unchanged
    assert rows[f"b@{RELAY}"].sent_sha256 is None  # deferred: nothing left
    assert rows[f"c@{RELAY}"].sent_sha256 is None  # delivered without a digest (older engine)
    for row in rows.values():
        assert set(row.tags) >= {"spf=pass", "dkim=none"}


async def test_outcome_for_a_row_not_leased_by_the_caller_records_no_digest(
    store: Store,
) -> None:
    await add_domain(store, RELAY)
    await put(store, [f"a@{RELAY}"])
    (job,) = await claim(store, RELAY, owner="node-a")
    (a,) = job.recipients
    stray = RecipientOutcome(a.id, RecipientState.DELIVERED, "250 ok", "t", sent_sha256=SENT)
    await store.record_outcomes("node-b", [stray])
    assert (await report(store))[f"a@{RELAY}"].sent_sha256 is None
    await store.record_outcomes("node-a", [stray])  # positive control: the owner's counts
    assert (await report(store))[f"a@{RELAY}"].sent_sha256 == SENT
