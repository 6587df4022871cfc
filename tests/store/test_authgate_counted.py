"""The release gate (``delivery.authgate``) counts the relayed messages it lets go without
their arrival verdict (``mxspool_auth_released_without_verdict_total``), and only those: a
message whose verdict is stored, or that is still within its bound, is not counted."""

from __future__ import annotations

import time

from mxspool import metrics
from mxspool.delivery.authgate import SLACK, wait_for_verdicts
from mxspool.envelope import MailParams
from mxspool.store.base import DeliveryJob, Store
from tests.store.test_contract import put


def job(message_id: str, received_at: float) -> DeliveryJob:
    return DeliveryJob(message_id, "relay.test", "a@src.test", MailParams(), 10, received_at, ())


def counted() -> float:
    return metrics.REGISTRY.get_sample_value("mxspool_auth_released_without_verdict_total") or 0.0


async def test_only_messages_leaving_without_a_verdict_are_counted(store: Store) -> None:
    judged, unjudged = [await put(store, ["a@relay.test"]) for _ in range(2)]
    await store.set_authentications([(judged, "mx.test; dkim=none", ("dkim=none",))])
    long_ago = time.time() - 60

    before = counted()
    await wait_for_verdicts(store, [job(judged, long_ago)], wait=1.0)
    assert counted() == before  # it has its verdict: not counted

    await wait_for_verdicts(store, [job(unjudged, long_ago)], wait=1.0)
    assert counted() == before  # past its bound already at the claim: let go without a query

    now = time.time()
    started = time.monotonic()
    await wait_for_verdicts(store, [job(unjudged, now), job(judged, now)], wait=0.2)
    assert time.monotonic() - started >= 0.2 + SLACK - 0.1  # it waited for the verdict
    assert counted() == before + 1  # the unjudged one left without it, counted once
