"""Notifications from a two-node PostgreSQL cluster, two real ``mxspool serve`` processes: each
event is told once for the cluster (only the leader speaks), the leader tells of a node killed
with SIGKILL (``node_lost``), and when the leader itself is killed the other node takes over
and tells the next event, once (and a condition still true, once more: the documented price
of a fresh baseline)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Spooler
from tests.delivery.target import Target
from tests.e2e.test_notify import SECRET, add_notify, receiver, send
from tests.notify_receiver import Receiver
from tests.store.conftest import pg_server, pg_url
from tests.waiting import stays, wait_until

__all__ = ["pg_server", "pg_url", "receiver"]  # fixtures used by this module

INTERVAL = 0.2


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target().start()
    server.behaviour.rcpt_replies["bad@one.test"] = "550 5.1.1 no such user"
    server.behaviour.rcpt_replies["bad@two.test"] = "550 5.1.1 no such user"
    yield server
    server.stop()


def _node(spooler_factory: Any, pg_url: str, name: str, receiver: Receiver) -> Spooler:
    node: Spooler = spooler_factory(
        smtp={"hostname": name},
        store={"url": pg_url, "min_free_space": "0"},
        delivery={"retry_schedule": ["1s"], "lease": "5s"},
        notifications={"interval": f"{INTERVAL}s", "node_timeout": "2s", "disk_warning": "1B"},
    )
    add_notify(node, {"name": "hook", "url": receiver.url, "secret": SECRET, "backoff": "0.2s"})
    return node


def _parked(receiver: Receiver, domain: str) -> list[dict[str, Any]]:
    return [event for event in receiver.accepted("parked") if event["domain"] == domain]


def test_one_voice_per_cluster_node_lost_and_failover(
    spooler_factory: Any, pg_url: str, receiver: Receiver, target: Target
) -> None:
    first = _node(spooler_factory, pg_url, "mx1.test.local", receiver)
    second = _node(spooler_factory, pg_url, "mx2.test.local", receiver)
    for domain in ("one.test", "two.test"):
        route = f"127.0.0.1:{target.port}"
        first.cli("domain", "add", domain, "--route", route, "--tls", "off")
    first.start()
    second.start()
    nodes = {"mx1.test.local": first, "mx2.test.local": second}

    # A parked recipient, sent through one node and delivered by either: told once.
    send(second, ["ok@one.test", "bad@one.test"])
    told = wait_until(lambda: _parked(receiver, "one.test"), 30, "the parked notification")
    leader_name = told[0]["node"]
    stays(lambda: len(_parked(receiver, "one.test")) == 1, 5 * INTERVAL, "one notification")
    leader = nodes.pop(leader_name)
    (other_name, other), *_ = nodes.items()

    # The other node dies: the leader tells, naming it, once.
    other.kill()

    def lost() -> list[dict[str, Any]]:
        return receiver.accepted("node_lost")

    event = wait_until(lost, 30, "node_lost")[0]
    assert event["node"] == leader_name
    assert event["details"]["lost_node"] == other_name
    stays(lambda: len(lost()) == 1, 5 * INTERVAL, "node_lost told once")

    # It comes back; then the leader dies: the survivor takes over and tells the next event.
    other.start()
    wait_until(lambda: other.cli("status").returncode == 0, 10, "the node back")
    leader.kill()
    send(other, ["bad@two.test"], 1)
    told = wait_until(lambda: _parked(receiver, "two.test"), 60, "the survivor's notification")
    assert told[0]["node"] == other_name
    stays(lambda: len(_parked(receiver, "two.test")) == 1, 5 * INTERVAL, "told once")
    # A condition still true when a node becomes leader is told once more, by it (README).
    repeated = _parked(receiver, "one.test")[1:]
    assert len(repeated) <= 1 and all(item["node"] == other_name for item in repeated)
