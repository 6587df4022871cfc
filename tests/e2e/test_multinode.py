"""Two `mxspool serve` nodes on one PostgreSQL store: shared queue, delivered once."""

from __future__ import annotations

import re
import smtplib
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Spooler
from tests.delivery.target import Target
from tests.e2e.test_release import send_many, wait_until
from tests.store.conftest import pg_server, pg_url

__all__ = ["pg_server", "pg_url"]  # fixtures used by this module

DELIVERY = {"retry_schedule": ["1s"], "concurrency": 8, "connect_timeout": "5s", "lease": "5s"}


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target().start()
    yield server
    server.stop()


def _cluster(spooler_factory: Any, pg_url: str, **delivery: Any) -> tuple[Spooler, Spooler]:
    nodes: list[Spooler] = [
        spooler_factory(
            smtp={"hostname": f"mx{i}.test.local"},  # a name of its own (docs/multi-node.md)
            store={"url": pg_url, "min_free_space": "0"},
            delivery={**DELIVERY, **delivery},
        )
        for i in (1, 2)
    ]
    return nodes[0], nodes[1]


def test_a_node_does_not_serve_under_a_running_node_name(spooler_factory: Any, pg_url: str) -> None:
    """A second node with a running node's [smtp] hostname waits for the name (store.nodename)
    and opens no listener; it serves once the first is killed (kill -9 lets go at once)."""
    store = {"url": pg_url, "min_free_space": "0"}
    first = spooler_factory(smtp={"hostname": "mx1.test.local"}, store=store)
    twin = spooler_factory(smtp={"hostname": "mx1.test.local"}, store=store)
    other = spooler_factory(smtp={"hostname": "mx2.test.local"}, store=store)
    first.start()
    started: list[BaseException | None] = []

    def start_twin() -> None:
        try:
            twin.start(timeout=120)  # it waits for the name meanwhile
            started.append(None)
        except BaseException as exc:  # reported by the assertion below
            started.append(exc)

    starter = threading.Thread(target=start_twin, daemon=True)
    starter.start()
    wait_until(
        lambda: (
            twin.log.exists() and "is held by a connection from 127.0.0.1" in twin.log.read_text()
        ),
        30,
        "the twin waiting for its name",
    )
    other.start()  # the control: a node with a name of its own starts meanwhile
    assert not started and twin.proc is not None and twin.proc.poll() is None
    with pytest.raises(OSError):  # the twin listens on nothing yet
        socket.create_connection(("127.0.0.1", twin.port), timeout=1).close()
    first.kill()
    starter.join(timeout=60)
    assert started == [None], started
    with smtplib.SMTP("127.0.0.1", twin.port, timeout=10) as client:
        assert "mx1.test.local" in client.ehlo()[1].decode()


def _message_id(data: bytes) -> str:
    found = re.search(rb"Message-ID: <([^>]+)>", data)
    assert found is not None
    return found.group(1).decode()


def _send_split(a: Spooler, b: Spooler, total: int, seed: int) -> dict[str, bytes]:
    """Half of the messages to each node, at the same time."""
    results: list[dict[str, bytes]] = [{}, {}]

    def run(index: int, node: Spooler) -> None:
        results[index] = send_many(node.port, total // 2, clients=4, seed=seed + index)

    threads = [threading.Thread(target=run, args=(i, n)) for i, n in enumerate((a, b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    sent = {**results[0], **results[1]}
    assert len(sent) == total
    return sent


@pytest.mark.slow
def test_two_nodes_release_each_message_exactly_once(
    spooler_factory: Any, pg_url: str, target: Target
) -> None:
    a, b = _cluster(spooler_factory, pg_url)
    a.cli("domain", "add", "example.test", "--route", f"127.0.0.1:{target.port}", "--tls", "off")
    b.cli("domain", "hold", "example.test")  # a change through the other node's CLI
    a.start()
    b.start()
    sent = _send_split(a, b, 2000, seed=3)
    control = Target().start()
    try:  # the nodes deliver relay mail (the positive control)...
        for node in (a, b):
            node.deliver_control(control.port, lambda: len(control.recorder.received))
    finally:
        control.stop()
    assert target.recorder.received == []  # ...but not held mail
    assert a.domain_status("example.test")["held"] == 2000
    b.cli("domain", "release", "example.test")
    wait_until(lambda: a.domain_status("example.test")["delivered"] == 2000, 180, "2,000 delivered")
    counts = Counter(_message_id(item.data) for item in target.recorder.received)
    assert len(counts) == 2000
    assert set(counts.values()) == {1}, "a message was delivered twice"
    assert {_message_id(body) for body in sent.values()} == set(counts)
    assert a.cli("report", "--check", check=False).returncode == 0


@pytest.mark.slow
def test_sigkill_one_node_during_release(spooler_factory: Any, pg_url: str, target: Target) -> None:
    a, b = _cluster(spooler_factory, pg_url, rate="150/s")
    a.cli("domain", "add", "example.test", "--route", f"127.0.0.1:{target.port}", "--tls", "off")
    a.cli("domain", "hold", "example.test")
    a.start()
    b.start()
    sent = _send_split(a, b, 1000, seed=5)
    a.cli("domain", "release", "example.test")
    # Kill once the release is under way (not at a fixed time: a loaded machine starts late).
    wait_until(lambda: len(target.recorder.received) >= 50, 60, "the release under way")
    arrived_at_kill = len(target.recorder.received)
    b.kill()
    assert 0 < arrived_at_kill < 1000, arrived_at_kill
    expected = {_message_id(body) for body in sent.values()}
    wait_until(
        lambda: expected <= {_message_id(item.data) for item in target.recorder.received},
        120,
        "every message at the target after one node died",
    )
    counts = Counter(_message_id(item.data) for item in target.recorder.received)
    duplicates = sum(count - 1 for count in counts.values())
    print(
        f"\nmulti-node kill: node B killed after {arrived_at_kill} of 1000 arrived; "
        f"{len(target.recorder.received)} deliveries, {duplicates} duplicates"
    )
    wait_until(
        lambda: a.domain_status("example.test")["delivered"] == 1000, 60, "the ledger caught up"
    )


@pytest.mark.slow
def test_cluster_wide_rate_limit_holds_at_the_target(
    spooler_factory: Any, pg_url: str, target: Target
) -> None:
    rate = 40.0
    a, b = _cluster(spooler_factory, pg_url, rate=f"{rate:.0f}/s")
    a.cli("domain", "add", "example.test", "--route", f"127.0.0.1:{target.port}", "--tls", "off")
    a.cli("domain", "hold", "example.test")
    a.start()
    b.start()
    _send_split(a, b, 400, seed=9)
    a.cli("domain", "release", "example.test")
    wait_until(lambda: len(target.recorder.received) >= 400, 120, "400 delivered")
    times = sorted(item.at for item in target.recorder.received)
    # Skip the first second: the buckets start full (one burst), then the rate rules.
    steady = [t for t in times if t >= times[0] + 1.0]
    measured = (len(steady) - 1) / (steady[-1] - steady[0])
    print(f"\ncluster-wide rate: configured {rate}/s, measured {measured:.1f}/s at the target")
    assert abs(measured - rate) <= rate * 0.10
