"""Client host names end to end: clients named by a PROXY header (the only way a test can come
from a public address), a real DNS server on loopback as ``[delivery] resolver``, and the name
where an administrator looks for it: our Received: line, the stored client record, the mail log
and ``mxspool log ID``. A name that does not resolve back stays ``unknown``; with
``reverse_lookup = false`` nothing is asked."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from mxspool.smtp.proxyproto import build_v1
from tests.conftest import Spooler
from tests.delivery.dnsserver import DnsServer
from tests.e2e.test_proxy_protocol import BALANCER, Client, _send, stored_client
from tests.waiting import wait_until

ZONE = """
10.2.0.192.in-addr.arpa. 60 IN PTR mail.sender.test.
mail.sender.test. 60 IN A 192.0.2.10
11.2.0.192.in-addr.arpa. 60 IN PTR liar.test.
liar.test. 60 IN A 192.0.2.99
"""


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as server:
        yield server


def _node(spooler_factory: Any, dns: DnsServer, **smtp: Any) -> Spooler:
    node: Spooler = spooler_factory(
        smtp={"proxy_from": [f"{BALANCER}/32"], **smtp}, delivery={"resolver": dns.address}
    )
    log = node.root / "mail.log"
    node.config.write_text(node.config.read_text() + f'[log]\nfile = "{log}"\n')
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--hold")
    node.start()
    return node


def _session(node: Spooler, source: str) -> Client:
    client = Client(node.port, BALANCER)
    client.send(build_v1((source, 40000), ("127.0.0.1", node.port)))
    assert client.reply()[0] == 220
    return client


def _stored(node: Spooler, queue_id: str) -> tuple[str | None, bytes]:
    """The stored client host name of a message, and our Received: line."""
    client, received = stored_client(node, queue_id)
    return client.hostname, received


def test_a_confirmed_name_is_shown_and_an_unconfirmed_one_is_not(
    spooler_factory: Any, dns: DnsServer
) -> None:
    node = _node(spooler_factory, dns)
    ids = {}
    for source, result in (("192.0.2.10", "confirmed"), ("192.0.2.11", "not_confirmed")):
        client = _session(node, source)
        # The lookup runs beside the session; wait for its answer before DATA.
        wait_until(
            lambda r=result: node.metric("mxspool_reverse_lookups_total", result=r),
            10,
            f"a {result} lookup",
        )
        ids[source] = _send(client, f"from {source}")
        client.close()
    hostname, received = _stored(node, ids["192.0.2.10"])
    assert hostname == "mail.sender.test"
    assert received.startswith(b"Received: from client.example (mail.sender.test [192.0.2.10])")
    hostname, received = _stored(node, ids["192.0.2.11"])
    assert hostname is None  # its PTR name points elsewhere
    assert received.startswith(b"Received: from client.example ([192.0.2.11])")
    named = node.cli("log", ids["192.0.2.10"]).stdout
    assert "client=mail.sender.test[192.0.2.10]" in named
    assert "client=unknown[192.0.2.11]" in node.cli("log", ids["192.0.2.11"]).stdout
    log = (node.root / "mail.log").read_text()
    assert "disconnect: client=mail.sender.test[192.0.2.10]" in log


def test_reverse_lookup_off_asks_nothing(spooler_factory: Any, dns: DnsServer) -> None:
    node = _node(spooler_factory, dns, reverse_lookup=False)
    client = _session(node, "192.0.2.10")
    queue_id = _send(client, "no lookup")
    client.close()
    hostname, received = _stored(node, queue_id)
    assert hostname is None
    assert received.startswith(b"Received: from client.example ([192.0.2.10])")
    assert node.metric("mxspool_reverse_lookups_total") == 0.0  # (metric() waits for an answer)
    # Positive control: the same client to a node that looks names up gets its name.
    other = _node(spooler_factory, dns)
    client = _session(other, "192.0.2.10")
    wait_until(
        lambda: other.metric("mxspool_reverse_lookups_total", result="confirmed"),
        10,
        "a confirmed lookup",
    )
    assert _stored(other, _send(client, "lookup"))[0] == "mail.sender.test"
    client.close()
