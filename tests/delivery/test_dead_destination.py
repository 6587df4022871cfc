"""Dead destinations: a route that refuses connections costs a few connection attempts and one
store update for its whole queue, not an attempt (or a store write) per recipient; when it
comes back, the whole queue goes at the next probe.

The end-to-end test runs ``mxspool serve`` as a real process against a loopback port whose
listener accepts and resets every connection (so each connection attempt is counted), then
puts a real SMTP target on that same port.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from mxspool import metrics
from mxspool.body import BodyBuffer
from mxspool.envelope import Envelope, MailParams, Recipient
from mxspool.ids import new_queue_id
from mxspool.store.base import (
    ClientInfo,
    IncomingMessage,
    RecipientOutcome,
    RecipientRecord,
    RecipientState,
)
from mxspool.store.sqlite import SqliteStore
from tests.conftest import Spooler, free_port
from tests.delivery.conftest import EngineFactory, add_domain, put_message, wait_for
from tests.delivery.target import Target

DOMAIN = "dead.test"
PROBE_AFTER = 4.0
"""The retry (probe) interval of test_whole_queue_goes_at_the_probe_...: wide enough that the
checks made before the probe are still before it when a loaded machine stalls a second."""
HELD = 20_000
WINDOW = 8.0
"""Seconds after the release over which attempts and CPU are measured (two probes)."""


class ResettingPort:
    """A listener on 127.0.0.1 that counts connections and resets each one at once.

    To the client this is a failed connection attempt (reset before the greeting), the same
    class of failure as a refused connection, but countable here.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.accepted = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(512)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            # SO_LINGER 0: close sends RST; no TIME_WAIT is left on the port.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


class TargetOn(Target):
    """The test target on a port chosen by the test."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port
        self.controller.port = port


@pytest.fixture
def dead_port() -> Iterator[ResettingPort]:
    listener = ResettingPort(free_port())
    yield listener
    listener.close()


async def _fill(db: Path, count: int) -> None:
    """``count`` one-recipient messages for DOMAIN, stored as the intake would."""
    store = SqliteStore(f"sqlite:///{db}")
    await store.open()
    try:
        for start in range(0, count, 1000):
            await asyncio.gather(
                *(store.accept_message(_message(n)) for n in range(start, min(count, start + 1000)))
            )
    finally:
        await store.close()


def _message(number: int) -> IncomingMessage:
    data = f"Subject: {number}\r\nMessage-ID: <m{number}@src.test>\r\n\r\nhello\r\n".encode()
    body = BodyBuffer(1 << 20)
    body.write(data)
    return IncomingMessage(
        id=new_queue_id(),
        envelope=Envelope(
            "sender@src.test",
            MailParams(size=len(data)),
            (Recipient(f"user{number}@{DOMAIN}"),),
        ),
        client=ClientInfo("127.0.0.1", "client.test"),
        received_at=time.time(),
        message_id=None,
        body=body,
    )


def _counts(db: Path) -> dict[str, Any]:
    """Recipient rows by what they show, read from the spool as `queue list` would."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        row = conn.execute(
            "SELECT count(*),"
            " sum(state = 'pending' AND last_reply LIKE '4.4.1 destination dead:%'),"
            " sum(state = 'delivered'), sum(attempts), max(attempts),"
            " (SELECT count(*) FROM attempts)"
            " FROM recipients"
        ).fetchone()
    finally:
        conn.close()
    total, dead, delivered, attempts, most, logged = (value or 0 for value in row)
    return {
        "total": total,
        "dead": dead,
        "delivered": delivered,
        "attempts": attempts,
        "max_attempts": most,
        "attempt_rows": logged,
    }


def _wait(check: Any, within: float, what: str) -> float:
    """Seconds until ``check()`` is true; fails after ``within``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise AssertionError(f"{what}: not within {within}s")
        time.sleep(0.05)
    return time.monotonic() - started


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


@pytest.mark.slow
def test_dead_destination_costs_a_few_attempts_and_resumes_at_the_next_probe(
    spooler_factory: Any, dead_port: ResettingPort
) -> None:
    node: Spooler = spooler_factory(
        delivery={
            "concurrency": 10,
            "retry_schedule": ["4s"],
            "dead_after_failures": 3,
            "connect_timeout": "5s",
        }
    )
    node.cli(
        "domain", "add", DOMAIN, "--route", f"127.0.0.1:{dead_port.port}", "--tls", "off", "--hold"
    )
    asyncio.run(_fill(node.db, HELD))
    node.start()
    assert node.proc is not None
    proc = psutil.Process(node.proc.pid)
    _wait(lambda: dead_port.accepted == 0, 1, "held mail must not leave")  # control below

    cpu_before = _cpu(proc)
    node.cli("domain", "release", DOMAIN)
    released = time.monotonic()
    to_defer = _wait(lambda: _counts(node.db)["dead"] == HELD, 20, "every recipient deferred")
    # Two probe intervals: a per-recipient loop would still be churning through the queue.
    time.sleep(max(0.0, released + WINDOW - time.monotonic()))
    cpu = _cpu(proc) - cpu_before
    attempts = dead_port.accepted
    counts = _counts(node.db)
    print(
        f"\n{HELD} recipients to a resetting port: deferred all in {to_defer:.2f}s, "
        f"{attempts} connection attempts, {cpu:.2f} CPU s in {WINDOW:.0f} s, {counts}"
    )
    assert attempts >= 3  # positive control: the engine did try the port
    assert attempts <= 10, attempts
    assert cpu < 5.0, cpu
    # A destination-level deferral burns no recipient's retry budget: only real attempts count.
    assert counts["attempts"] == attempts
    assert counts["attempt_rows"] == attempts
    # The recipients the engine really tried show the remote's error; every other one says why
    # it waits. Which rows were tried depends on scheduling, so look at the untried ones.
    listed = json.loads(
        node.cli("queue", "list", "--domain", DOMAIN, "--limit", "50", "--json").stdout
    )
    untried = [row for row in listed if row["attempts"] == 0]
    assert untried, listed  # at most 10 attempts among 50 rows
    for row in untried:
        reply = row["last_reply"] or ""
        assert "destination dead" in reply and "will probe at" in reply, row

    # The destination comes back on the same port: everything goes at the next probe.
    dead_port.close()
    target = TargetOn(dead_port.port).start()
    try:
        came_back = time.monotonic()
        to_deliver = _wait(
            lambda: _counts(node.db)["delivered"] == HELD, 60, "the whole queue delivered"
        )
        first = min(item.at for item in target.recorder.received) - time.time() + time.monotonic()
        print(
            f"back: first delivery after {first - came_back:.2f}s, whole queue delivered "
            f"{to_deliver:.2f}s later (probe every 4s), "
            f"{target.recorder.max_active} sessions at most"
        )
        assert len(target.recorder.deliveries()) == HELD
        assert time.monotonic() - came_back < 40
    finally:
        target.stop()


# -- in process: the engine against the resetting port, then a target --------------------------
async def _recipients(store: SqliteStore, message_ids: list[str]) -> list[RecipientRecord]:
    found: list[RecipientRecord] = []
    for message_id in message_ids:
        message = await store.get_message(message_id)
        assert message is not None
        found += message.recipients
    return found


def _dead_gauge() -> float | None:
    return metrics.REGISTRY.get_sample_value("mxspool_destination_dead", {"domain": DOMAIN})


async def test_whole_queue_goes_at_the_probe_even_recipients_with_a_later_own_retry(
    store: SqliteStore, engine: EngineFactory, dead_port: ResettingPort
) -> None:
    await add_domain(store, dead_port.port, name=DOMAIN, hold=False)
    now = time.time()
    # Five recipients already tried once: a 451, their own retry an hour away.
    later = [(await put_message(store, [f"later{n}@{DOMAIN}"]))[0] for n in range(5)]
    claimed = await store.claim_due("earlier-node", now, 30.0, 100, DOMAIN)
    await store.record_outcomes(
        "earlier-node",
        [
            RecipientOutcome(r.id, RecipientState.PENDING, "451 4.3.0 later", "mx", now + 3600)
            for job in claimed
            for r in job.recipients
        ],
    )
    fresh = [(await put_message(store, [f"u{n}@{DOMAIN}"]))[0] for n in range(25)]
    everyone = later + fresh
    # The probe interval leaves room for the checks made before the probe on a loaded machine.
    engine(concurrency=4, retry=(PROBE_AFTER,))

    async def all_dead(ids: list[str]) -> bool:
        rows = await _recipients(store, ids)
        return all((r.last_reply or "").startswith("4.4.1 destination dead:") for r in rows)

    await wait_for(lambda: all_dead(everyone), within=10)
    tried = dead_port.accepted
    assert 3 <= tried <= 5, tried  # a cohort of 3 in parallel, not one per recipient
    rows = await _recipients(store, everyone)
    (probe_at,) = {r.next_attempt_at for r in rows}  # one probe time for the whole queue...
    assert probe_at > now + 1  # ...also for those whose own retry was an hour away
    assert "(3 consecutive connection failures); will probe at" in (rows[0].last_reply or "")
    # Only real connection attempts count against a recipient: the deferral itself does not.
    assert sum(r.attempts for r in rows) == 5 + tried
    assert _dead_gauge() == 1.0

    # New mail while the destination is dead waits for the probe without a connection.
    newcomer, _ = await put_message(store, [f"new@{DOMAIN}"])
    await wait_for(lambda: all_dead([newcomer]), within=PROBE_AFTER / 2)
    assert time.time() < probe_at and dead_port.accepted == tried
    # ...and costs its own row, not another pass over the queue.
    assert [r.updated_at for r in await _recipients(store, everyone)] == [
        r.updated_at for r in rows
    ]
    everyone.append(newcomer)

    # The probe: one connection, then the whole queue is deferred to the next one.
    await wait_for(lambda: dead_port.accepted > tried, within=PROBE_AFTER + 5)

    async def deferred_again() -> bool:
        return await all_dead(everyone) and await _probe_times(store, everyone, probe_at)

    await wait_for(deferred_again, within=5)
    assert dead_port.accepted == tried + 1
    assert _dead_gauge() == 1.0

    # The destination comes back: the whole queue goes at the next probe, at once.
    dead_port.close()
    target = TargetOn(dead_port.port).start()
    try:

        async def all_delivered() -> bool:
            rows = await _recipients(store, everyone)
            return all(r.state is RecipientState.DELIVERED for r in rows)

        await wait_for(all_delivered, within=PROBE_AFTER + 6)
        assert len(target.recorder.deliveries()) == len(everyone)  # each once
        assert _dead_gauge() == 0.0
    finally:
        target.stop()


async def _probe_times(store: SqliteStore, ids: list[str], before: float) -> bool:
    """True once every recipient waits for a probe later than ``before``."""
    return all(r.next_attempt_at > before for r in await _recipients(store, ids))


async def test_dead_destination_queue_expires_after_max_age_without_attempts(
    store: SqliteStore, engine: EngineFactory, dead_port: ResettingPort
) -> None:
    await add_domain(store, dead_port.port, name=DOMAIN, hold=False)
    ids = [(await put_message(store, [f"u{n}@{DOMAIN}"]))[0] for n in range(40)]
    engine(concurrency=4, retry=(0.3,), max_age=1.5)

    async def all_parked() -> bool:
        rows = await _recipients(store, ids)
        return all(r.state is RecipientState.PARKED for r in rows)

    await wait_for(all_parked, within=10)
    rows = await _recipients(store, ids)
    expired = [r for r in rows if (r.last_reply or "").startswith("expired: not delivered")]
    assert len(expired) == len(rows)
    # Parked by the destination's deferral, not one attempt at a time.
    by_deferral = [r for r in expired if "last error: 4.4.1 destination dead:" in r.last_reply]
    assert len(by_deferral) >= len(rows) - 10, [r.last_reply for r in rows]
    assert sum(r.attempts for r in rows) == dead_port.accepted
    assert dead_port.accepted <= 15, dead_port.accepted
