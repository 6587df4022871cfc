"""The exchange-online profile's backoff on busy replies (451 4.7.5xx), measured at a target
that answers like a busy Exchange Online (``exo_target``): sparse busy replies leave the rate
alone, a sustained busy signal slows it to the floor, and it recovers once the target is
healthy again. The AIMD rule on its own (``backoff.AdaptiveRate``) first, then over SMTP."""

from __future__ import annotations

import itertools
import random
import time

import pytest

from mxspool.delivery import backoff, exchange
from mxspool.store.sqlite import SqliteStore
from tests.delivery.conftest import DOMAIN, EngineFactory, add_domain, put_message, release
from tests.delivery.exo_target import ExoTarget
from tests.waiting import eventually

EXO = exchange.PROFILE
ONE_RCPT_BUSY = 1 - 0.95**3
"""A one-recipient transaction meets a busy reply when any of MAIL, RCPT, DATA gets one."""


def _run(
    adaptive: backoff.AdaptiveRate,
    configured: float,
    seconds: float,
    busy: float,
    start: float,
    rng: random.Random,
) -> list[tuple[float, float]]:
    """Drive ``adaptive`` as a drain would: one transaction per token at the effective rate,
    each busy with probability ``busy``; (time, rate in force) of every transaction."""
    now, seen = start, []
    while now < start + seconds:
        rate = adaptive.effective(configured)
        seen.append((now, rate))
        adaptive.observe(now, 1, int(rng.random() < busy), rate)
        now += 1.0 / rate
    return seen


def _mean_rate(seen: list[tuple[float, float]]) -> float:
    """The time-weighted mean of the rates in force."""
    weighted = sum((b[0] - a[0]) * a[1] for a, b in itertools.pairwise(seen))
    return weighted / (seen[-1][0] - seen[0][0])


def test_aimd_ignores_sparse_busy_replies_and_backs_off_from_sustained_ones() -> None:
    rng = random.Random(7)
    adaptive = backoff.AdaptiveRate()
    # 5% of commands busy, for ten minutes: the rate stays the configured one (at a low rate,
    # few transactions a window, a rare unlucky window costs a little).
    for configured, kept in ((50.0, 1.0), (5.0, 0.9)):
        sparse = _run(adaptive, configured, 600.0, ONE_RCPT_BUSY, 0.0, rng)
        assert _mean_rate(sparse) >= kept * configured, (configured, _mean_rate(sparse))
    assert adaptive.limit is None
    # Every reply busy: halved every window, near the floor within seconds, then at it.
    sustained = _run(adaptive, 50.0, 60.0, 1.0, 600.0, rng)
    assert max(rate for at, rate in sustained if at >= 604.0) <= 50.0 / 8
    assert max(rate for at, rate in sustained if at >= 620.0) <= 1.0
    assert sustained[-1][1] == backoff.MIN_RATE
    # Healthy again: a tenth of the ceiling back per calm window, then not limited at all.
    recovery = _run(adaptive, 50.0, 40.0, 0.0, 660.0, rng)
    rates = [rate for _, rate in recovery]
    steps = [b - a for a, b in itertools.pairwise(rates) if b != a]
    assert steps and min(steps) > 0 and max(steps) <= 5.0 + 1e-9  # additive, a tenth at most
    assert rates[-1] == 50.0 and adaptive.limit is None
    back_at = next(at for at, rate in recovery if rate == 50.0)
    assert back_at - 660.0 <= 35.0, back_at  # from the floor (one try per 10 s) in half a minute


def test_aimd_on_an_unpaced_destination_comes_back_unpaced() -> None:
    adaptive = backoff.AdaptiveRate()
    now = 0.0
    for _ in range(12):  # a busy window (over a second) at the 200/s seen
        adaptive.observe(now, 1, 1, 200.0)
        now += 0.11
    assert adaptive.effective(0.0) == 100.0
    for _ in range(200):
        if adaptive.limit is None:
            break
        adaptive.observe(now, 1, 0, adaptive.effective(0.0))
        now += 0.1
    assert adaptive.limit is None and adaptive.effective(0.0) == 0.0


async def _release_rate(store: SqliteStore, name: str, target: ExoTarget, count: int) -> float:
    """Release ``name`` and wait until every message arrived once; messages per second."""
    started = time.time()
    await release(store, name)
    received = target.recorder.received
    await eventually(lambda: len(received) >= count, 25, f"the release of {name}")
    assert len({rcpt for rcpt, _ in target.recorder.deliveries()}) == count == len(received)
    return count / (max(item.at for item in received) - started)


async def test_five_percent_busy_keeps_at_least_half_the_rate(
    store: SqliteStore, engine: EngineFactory
) -> None:
    rate, count = 50.0, 200
    healthy = ExoTarget().start()
    busy = ExoTarget(busy_share=0.05, seed=5).start()
    try:
        for name, target in (("healthy.test", healthy), ("busy.test", busy)):
            await add_domain(store, target.port, name=name, rate=rate, profile=EXO)
            for number in range(count):
                await put_message(store, [f"u{number}@{name}"])
        engine(concurrency=4, retry=(0.2,))
        unthrottled = await _release_rate(store, "healthy.test", healthy, count)
        throttled = await _release_rate(store, "busy.test", busy, count)
    finally:
        healthy.stop()
        busy.stop()
    ratio = throttled / unthrottled
    print(f"unthrottled {unthrottled:.1f}/s, 5% busy {throttled:.1f}/s: {ratio:.2f}")
    # Positive controls: the healthy release went at its rate, the busy target was busy.
    assert unthrottled >= rate * 0.5, unthrottled
    assert busy.exo.busy_given >= 0.5 * 0.05 * 3 * count, busy.exo.busy_given
    assert healthy.exo.busy_given == 0
    assert ratio >= 0.5, ratio


async def test_sustained_busy_slows_to_the_floor_then_recovers(
    store: SqliteStore, engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    floor, rate = 2.0, 40.0
    monkeypatch.setattr(backoff, "MIN_RATE", floor)  # the floor in reach within seconds
    target = ExoTarget().start()
    try:
        await add_domain(store, target.port, rate=rate, profile=EXO)
        for number in range(500):
            await put_message(store, [f"u{number}@{DOMAIN}"])
        engine(concurrency=4, retry=(0.2,))
        mails = target.exo.mail_times
        received = target.recorder.received

        def per_second(times: list[float], seconds: float) -> float:
            since = time.time() - seconds
            return sum(1 for t in times[-int(rate * seconds) - 10 :] if t >= since) / seconds

        def delivered() -> list[float]:
            return [item.at for item in received[-int(rate) - 10 :]]

        await release(store)
        # Positive control: at the configured rate while the target is healthy.
        await eventually(lambda: per_second(delivered(), 1.0) >= rate * 0.75, 10, "full rate")
        target.exo.busy_all = True
        busy_from = time.time()
        await eventually(lambda: per_second(mails, 2.0) <= 2.5 * floor, 15, "the floor")
        slowed = time.time() - busy_from
        # Near the floor, not stopped: it still tries now and then.
        tried = len(mails)
        await eventually(lambda: len(mails) > tried, 5, "an attempt at the floor")
        assert not received or received[-1].at < busy_from + 1.0  # nothing got through
        target.exo.busy_all = False
        healthy_from = time.time()
        await eventually(lambda: per_second(delivered(), 1.0) >= rate * 0.75, 20, "recovery")
        recovered = time.time() - healthy_from
    finally:
        target.stop()
    print(f"slowed to the floor in {slowed:.1f} s, recovered in {recovered:.1f} s")
    assert len({rcpt for rcpt, _ in target.recorder.deliveries()}) == len(received)
