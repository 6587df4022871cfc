"""Authentication at arrival over real SMTP against `mxspool serve` (issue 11 point 4): SPF,
DKIM and DMARC judged just after the commit, stored with the message as an
Authentication-Results value and spf=/dkim=/dmarc= tags; the 250 never waits on DNS; a relayed
message leaves only once its verdict is stored (or its bound has passed).

DNS comes from a dnslib server on 127.0.0.1 publishing the DKIM keys the test signs with
(dkimpy), SPF and DMARC records; ``spf_check_private`` makes the 127.0.0.1 client count as an
outside one. A second server never answers.
"""

from __future__ import annotations

import contextlib
import smtplib
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Spooler, quiet_dns
from tests.delivery.dnsserver import DnsServer
from tests.delivery.target import Target
from tests.e2e.authkit import Key, SilentDns, message
from tests.waiting import stays, wait_until

KEY = Key()
ZONE = "\n".join(
    [
        KEY.record("sel", "signed.test"),
        'signed.test. 60 IN TXT "v=spf1 ip4:127.0.0.1 -all"',
        '_dmarc.signed.test. 60 IN TXT "v=DMARC1; p=reject"',
        'forged.test. 60 IN TXT "v=spf1 -all"',
        '_dmarc.forged.test. 60 IN TXT "v=DMARC1; p=reject"',
        "nodmarc.test. 60 IN A 192.0.2.1",
    ]
)
BOUND = 4.0
"""[smtp] authentication_timeout of these nodes: long enough that a loaded machine stalling the
test for a second or two cannot make "before the verdict" checks look after it."""


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer(ZONE).start()
    yield server
    server.stop()


@pytest.fixture
def silent() -> Iterator[SilentDns]:
    server = SilentDns()
    yield server
    server.close()


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target().start()
    yield server
    server.stop()


def node_with(spooler_factory: Any, resolver: str) -> Spooler:
    node: Spooler = spooler_factory(
        smtp={"spf_check_private": True, "authentication_timeout": f"{BOUND:g}s"},
        delivery={"resolver": resolver},
    )
    return node


def send(
    node: Spooler, sender: str, data: bytes, rcpt: str = "user@example.test"
) -> tuple[str, float]:
    """One message over SMTP; its queue id and the seconds from DATA to the 250."""
    with smtplib.SMTP("127.0.0.1", node.port, timeout=30) as client:
        client.ehlo("client.test")
        assert client.mail(sender)[0] == 250
        assert client.rcpt(rcpt)[0] == 250
        started = time.monotonic()
        code, text = client.data(data)
        elapsed = time.monotonic() - started
        assert code == 250, text
    return text.decode().rsplit(" ", 1)[-1], elapsed


def row(node: Spooler, queue_id: str) -> dict[str, Any]:
    with contextlib.closing(sqlite3.connect(node.db, timeout=10)) as conn:
        found = conn.execute(
            "SELECT m.auth_results, m.auth_at, m.tags, m.received_at, r.delivered_at, b.data "
            "FROM messages m JOIN recipients r ON r.message_seq = m.seq "
            "JOIN bodies b ON b.seq = m.seq WHERE m.id = ?",
            (queue_id,),
        ).fetchone()
    keys = ("auth_results", "auth_at", "tags", "received_at", "delivered_at", "data")
    return dict(zip(keys, found, strict=True))


def verdict(node: Spooler, queue_id: str, within: float = 15.0) -> dict[str, Any]:
    return wait_until(
        lambda: (found := row(node, queue_id))["auth_at"] is not None and found,
        within=within,
        what=f"the verdict of {queue_id}",
    )


def test_verdicts_are_stored_with_the_message(spooler_factory: Any, dns: DnsServer) -> None:
    node = node_with(spooler_factory, dns.address)
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--tls", "off", "--hold")
    node.start()
    signed = KEY.sign(message("a@signed.test"), "signed.test")
    expired = KEY.sign(message("a@signed.test"), "signed.test", expire_in=-11 * 3600)
    sent = {
        "signed": send(node, "a@signed.test", signed)[0],
        "forged": send(node, "x@forged.test", message("x@forged.test"))[0],
        "nodmarc": send(node, "a@nodmarc.test", message("a@nodmarc.test"))[0],
        "expired": send(node, "b@elsewhere.test", expired)[0],
    }
    found = {name: verdict(node, queue_id) for name, queue_id in sent.items()}

    good = found["signed"]
    assert good["auth_results"] == (
        "mx.test.local; spf=pass smtp.mailfrom=a@signed.test; "
        "dkim=pass header.d=signed.test header.s=sel; "
        "dmarc=pass header.from=signed.test policy.dmarc=reject"
    )
    assert good["tags"] == "spf=pass,dkim=pass,dmarc=pass"
    # The stored bytes are what was received plus our Received: line, nothing more.
    assert good["data"].endswith(signed) and b"Authentication-Results" not in good["data"]

    assert found["forged"]["tags"] == "spf=fail,dkim=none,dmarc=fail"
    assert (
        "dmarc=fail header.from=forged.test policy.dmarc=reject" in found["forged"]["auth_results"]
    )
    assert found["nodmarc"]["tags"] == "spf=none,dkim=none,dmarc=none"
    assert found["expired"]["tags"] == "spf=none,dkim=fail,dmarc=fail"
    assert "x= value is past" in found["expired"]["auth_results"]
    # What the operator sees (the message view lists the tags).
    assert "dmarc=fail" in node.cli("queue", "show", sent["forged"]).stdout


def test_a_node_without_a_resolver_asks_the_tests_own(spooler_factory: Any) -> None:
    """The suite is hermetic: a node a test starts without ``[delivery] resolver`` looks its
    background names up at the test process's quiet server (tests/conftest.py), which answers
    NXDOMAIN to all, never at the machine's resolver."""
    node: Spooler = spooler_factory()
    assert f'resolver = "{quiet_dns().address}"' in node.config.read_text()
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--tls", "off", "--hold")
    node.start()
    queue_id, _ = send(node, "a@quiet.test", message("a@quiet.test"))
    found = verdict(node, queue_id)
    assert found["tags"] == "dkim=none,dmarc=none"  # a loopback client: SPF not checked
    # The DMARC question for the From: domain reached the quiet server.
    questions = quiet_dns().resolver.questions
    assert ("_dmarc.quiet.test", "TXT") in questions, list(questions)


def test_silent_dns_delays_neither_the_250_nor_release_beyond_the_bound(
    spooler_factory: Any, dns: DnsServer, silent: SilentDns, target: Target
) -> None:
    route = f"127.0.0.1:{target.port}"
    fast = node_with(spooler_factory, dns.address)
    slow = node_with(spooler_factory, silent.address)
    for node in (fast, slow):
        node.cli("domain", "add", "example.test", "--route", route, "--tls", "off")
        node.start()
    data = KEY.sign(message("a@signed.test"), "signed.test")

    # Positive control: with DNS answering, the verdict is in and the message relayed at once.
    quick_id, quick_250 = send(fast, "a@signed.test", data)
    quick = verdict(fast, quick_id, within=BOUND)
    assert quick["tags"] == "spf=pass,dkim=pass,dmarc=pass"
    wait_until(lambda: len(target.recorder.received) == 1, 10, "the fast node's message relayed")
    delivered = wait_until(lambda: row(fast, quick_id)["delivered_at"], 10, "delivered_at")
    assert quick["auth_at"] <= delivered

    # DNS that never answers: the 250 does not wait for it (DKIM's key, DMARC's record and SPF
    # are all asked of it), and the message does not leave while its verdict is missing...
    slow_id, slow_250 = send(slow, "a@signed.test", data)
    assert slow_250 < BOUND / 2, (slow_250, quick_250)
    assert row(slow, slow_id)["auth_at"] is None  # no verdict yet: DNS has not answered
    stays(
        lambda: len(target.recorder.received) == 1,
        BOUND / 2,
        "nothing relayed before the verdict",
    )
    # ... which is temperror, recorded within the bound (plus the store write) ...
    late = verdict(slow, slow_id, within=BOUND + 5)
    assert late["auth_at"] - late["received_at"] < BOUND + 3
    assert late["tags"] == "spf=temperror,dkim=temperror,dmarc=temperror"
    # ... and then it is relayed, verdict stored first.
    wait_until(lambda: len(target.recorder.received) == 2, 15, "the slow node's message relayed")
    delivered = wait_until(lambda: row(slow, slow_id)["delivered_at"], 10, "delivered_at")
    assert late["auth_at"] <= delivered
    assert target.recorder.received[1].data.endswith(data)


def unjudged_mark(node: Spooler) -> int | None:
    """The node's mark of the verdicts it may owe (``Store.mark_unjudged``), if any."""
    with contextlib.closing(sqlite3.connect(f"file:{node.db}?mode=ro", uri=True)) as conn:
        row = conn.execute(
            "SELECT value FROM meta WHERE key = ?", ("unjudged:mx.test.local",)
        ).fetchone()
    return None if row is None else int(row[0])


def test_a_node_forgets_its_mark_when_it_serves_with_authentication_off(
    spooler_factory: Any, dns: DnsServer
) -> None:
    # With authentication on, serve notes at its start where the verdicts it may owe begin
    # (a crash's recovery reaches back to it) ...
    on = node_with(spooler_factory, dns.address)
    on.start()
    try:
        wait_until(lambda: unjudged_mark(on) is not None, what="the mark noted at start")
    finally:
        on.stop()
    # ... and on the same spool with it off forgets it before it greets anyone: mail accepted
    # now is never judged later as if at its arrival, should authentication be turned on again.
    off = Spooler(on.root, smtp={"authentication": False})
    off.start()
    try:
        assert unjudged_mark(off) is None
    finally:
        off.stop()
