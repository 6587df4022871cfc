"""The Exchange Online profile against a local target that answers like Exchange Online;
every reaction is measured at the target."""

from __future__ import annotations

import itertools
import time

import pytest

from mxspool.delivery import exchange, outcomes
from mxspool.store.sqlite import SqliteStore
from tests.delivery.conftest import (
    DOMAIN,
    EngineFactory,
    add_domain,
    delivered_control,
    put_message,
    release,
    rows,
    wait_for,
)
from tests.delivery.target import Target
from tests.waiting import still

EXO = exchange.PROFILE
NOT_READY = "550 5.4.1 Recipient address rejected: Access denied. AS(201806281)"


async def _row(store: SqliteStore, rcpt: str) -> tuple[str, str, int]:
    row = next(row for row in await rows(store) if row.rcpt == rcpt)
    return row.state, row.remote_reply or "", row.attempts


async def test_rate_limits_sent_as_5xx_stay_pending(
    store: SqliteStore, target: Target, engine: EngineFactory
) -> None:
    target.behaviour.rcpt_replies = {
        f"busy@{DOMAIN}": "550 5.2.121 Recipient's hourly message receive limit exceeded",
        f"pair@{DOMAIN}": "550 5.2.122 One of the recipient's hourly limits from the sender",
        f"gone@{DOMAIN}": "550 5.1.10 RESOLVER.ADR.RecipientNotFound",
    }
    await add_domain(store, target.port, hold=False, profile=EXO)
    await put_message(store, [f"busy@{DOMAIN}", f"pair@{DOMAIN}", f"gone@{DOMAIN}", f"ok@{DOMAIN}"])
    engine(retry=(30.0,))
    await wait_for(lambda: len(target.recorder.received) == 1)
    await wait_for(lambda: _settled(store))
    assert (await _row(store, f"busy@{DOMAIN}"))[:2] == (
        "pending",
        "550 5.2.121 Recipient's hourly message receive limit exceeded",
    )
    assert (await _row(store, f"pair@{DOMAIN}"))[0] == "pending"
    assert (await _row(store, f"gone@{DOMAIN}"))[0] == "parked"  # other 5xx still park
    assert (await _row(store, f"ok@{DOMAIN}"))[0] == "delivered"


async def test_a_busy_recipient_comes_back_sooner_than_the_schedule(
    store: SqliteStore, target: Target, engine: EngineFactory
) -> None:
    busy = "451 4.7.500 Server busy. Please try again later from [127.0.0.1]. (AS761)"
    target.behaviour.rcpt_replies = {
        f"busy@{DOMAIN}": busy,
        f"temp@{DOMAIN}": "451 4.3.0 Temporary failure",  # not a busy reply: the schedule's
    }
    await add_domain(store, target.port, hold=False, profile=EXO)
    await put_message(store, [f"busy@{DOMAIN}", f"temp@{DOMAIN}"])
    engine(retry=(30.0,))
    tries = target.recorder.rcpts

    def at(address: str) -> list[float]:
        return [when for when, rcpt, _ in tries if rcpt == address]

    # Busy six times in a row: 0.25 s apart three times, then doubling, far inside 30 s.
    await wait_for(lambda: len(at(f"busy@{DOMAIN}")) >= 6, within=15.0)
    gaps = [b - a for a, b in itertools.pairwise(at(f"busy@{DOMAIN}")[:6])]
    print(f"busy retried after {[round(g, 2) for g in gaps]} s")
    for gap, step in zip(gaps, (0.25, 0.25, 0.25, 0.5, 1.0), strict=True):
        assert step - 0.05 <= gap <= step + 1.0, gaps
    # The control: the other temporary failure, tried with the first, waits its 30 s step.
    assert len(at(f"temp@{DOMAIN}")) == 1, tries
    state, reply, attempts = await _row(store, f"temp@{DOMAIN}")
    assert (state, reply, attempts) == ("pending", "451 4.3.0 Temporary failure", 1)
    # Once the target takes it, the busy recipient is delivered on its next try.
    del target.behaviour.rcpt_replies[f"busy@{DOMAIN}"]
    await wait_for(lambda: _state(store, f"busy@{DOMAIN}", "delivered", ""), within=10.0)
    assert exchange.busy_delay(_context(30.0), 40) == 30.0  # capped by the schedule's step


def _context(step: float) -> outcomes.AttemptContext:
    return outcomes.AttemptContext("", 0.0, 0.0, outcomes.RetryPolicy((step,), 3600.0))


async def _settled(store: SqliteStore) -> bool:
    return all(row.state != "delivering" and row.attempts for row in await rows(store))


async def test_not_ready_at_target_is_rechecked_then_parked(
    store: SqliteStore,
    target: Target,
    engine: EngineFactory,
    control: Target,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(exchange, "NOT_READY_EVERY", 0.4)
    monkeypatch.setattr(exchange, "NOT_READY_FOR", 2.0)
    target.behaviour.rcpt_replies = {f"new@{DOMAIN}": NOT_READY}
    await add_domain(store, target.port, hold=True, profile=EXO)
    await put_message(store, [f"new@{DOMAIN}", f"ok@{DOMAIN}"])
    engine(retry=(0.1,))  # a plain deferral would come back every 0.1 s: 5.4.1 waits longer
    released_at = time.time()
    await release(store)
    await wait_for(lambda: _state(store, f"new@{DOMAIN}", "pending", "not ready at target"))
    _, reply, _ = await _row(store, f"new@{DOMAIN}")
    assert reply.startswith("not ready at target (re-checked every") and NOT_READY in reply
    await wait_for(lambda: _state(store, f"new@{DOMAIN}", "parked", "not ready at target for"))
    checks = [at for at, address, _ in target.recorder.rcpts if address == f"new@{DOMAIN}"]
    gaps = [b - a for a, b in itertools.pairwise(checks)]
    print(f"{len(checks)} checks, gaps {[round(g, 2) for g in gaps]}")
    # Re-checked every 0.4 s (never sooner) until 2 s after the release, then parked: about
    # five checks, fewer only if a loaded machine stalled the engine in between.
    assert 2 <= len(checks) <= 7, checks
    assert all(gap >= 0.35 for gap in gaps), gaps
    assert checks[-1] - released_at >= 2.0 - 0.05, (released_at, checks)
    # Parked: no more checks. The positive controls: the checks above came every 0.4 s, so
    # 1 s is more than two of their gaps; and the engine still polls and sends (the control).
    await delivered_control(store, control)
    await still(
        lambda: (
            len([a for _, a, _ in target.recorder.rcpts if a == f"new@{DOMAIN}"]) == len(checks)
        ),
        1.0,
        "no re-check of a parked recipient",
    )
    assert (await _row(store, f"ok@{DOMAIN}"))[0] == "delivered"


async def _state(store: SqliteStore, rcpt: str, state: str, reply_start: str) -> bool:
    got, reply, _ = await _row(store, rcpt)
    return got == state and reply.startswith(reply_start)


async def test_not_ready_outside_a_release_parks_at_once(
    store: SqliteStore, target: Target, engine: EngineFactory
) -> None:
    target.behaviour.rcpt_replies = {f"new@{DOMAIN}": NOT_READY}
    await add_domain(store, target.port, hold=False, profile=EXO)  # never held, never released
    await put_message(store, [f"new@{DOMAIN}"])
    engine()
    await wait_for(lambda: _state(store, f"new@{DOMAIN}", "parked", NOT_READY))


async def test_wrong_region_or_tenant_parks_with_the_route_explained(
    store: SqliteStore, target: Target, engine: EngineFactory, control: Target
) -> None:
    target.behaviour.data_replies = ["451 4.4.62 Mail sent to the wrong Office 365 region. ATTR35"]
    await add_domain(store, target.port, hold=False, profile=EXO)
    await put_message(store, [f"a@{DOMAIN}"])
    engine(retry=(0.1,))
    await wait_for(lambda: _state(store, f"a@{DOMAIN}", "parked", "wrong route"))
    _, reply, _ = await _row(store, f"a@{DOMAIN}")
    assert "451 4.4.62" in reply and "mxspool domain route" in reply
    # Parked: not retried on its own, though a deferral would be back within 0.1 s (retry) and
    # the engine keeps polling and sending (the control).
    await delivered_control(store, control)
    await still(lambda: target.recorder.mail_commands == 1, 0.5, "no retry of parked mail")


async def test_a_recipients_hourly_budget_defers_the_rest_unattempted(
    store: SqliteStore,
    target: Target,
    engine: EngineFactory,
    control: Target,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(exchange, "RECIPIENT_PER_HOUR", 180)  # a burst of 3, then 1 per 20 s
    await add_domain(store, target.port, hold=True, profile=EXO)
    for _ in range(5):
        await put_message(store, [f"hot@{DOMAIN}"])
    await put_message(store, [f"cold@{DOMAIN}"])
    engine()
    await release(store)
    await wait_for(lambda: len(target.recorder.received) == 4)
    await delivered_control(store, control)  # a later poll round sent nothing more for hot@
    assert (
        sorted(r for r, _ in target.recorder.deliveries())
        == [f"cold@{DOMAIN}"] + [f"hot@{DOMAIN}"] * 3
    )
    held_back = [row for row in await rows(store) if row.state == "pending"]
    assert len(held_back) == 2
    assert all(
        row.attempts == 0 and (row.remote_reply or "").startswith("paced") for row in held_back
    )


def test_gcra_keeps_every_hour_within_the_limit() -> None:
    pacer = exchange.RecipientPacer(per_recipient=120, per_pair=10_000)
    now, sent = 0.0, []
    for rid in range(400):
        at = pacer.admit(rid, "s@x.test", "r@y.test", now)
        sent.append(now if at == 0.0 else at)
    sent.sort()
    for index, start in enumerate(sent):
        assert sum(1 for t in sent[index:] if t - start < 3600.0) <= 120
    # A deferred recipient that comes back at its time goes without a second token.
    assert pacer.admit(399, "s@x.test", "r@y.test", sent[-1]) == 0.0
