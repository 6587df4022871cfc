"""SPF at arrival (issue 14 item 4): `mxspool serve` checks the sender's SPF in the background
and records the result as a tag (spf=pass|fail|...); `queue bounce` withholds the DSN to a
sender whose SPF failed, unless --force.

The client connects from 127.0.0.1, which SPF normally skips (internal relays are listed in no
SPF record): ``[smtp] spf_check_private = true`` makes it count as an outside client here, and
``[delivery] resolver`` points at a test DNS server publishing the SPF records.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mxspool.body import BodyBuffer
from mxspool.envelope import Envelope, MailParams, Recipient
from mxspool.intake.spf import SpfCheck, SpfChecker
from mxspool.store.base import ClientInfo, IncomingMessage, StoredMessage
from mxspool.store.sqlite import SqliteStore
from tests.conftest import Spooler
from tests.delivery.dnsserver import DnsServer, ZoneResolver
from tests.delivery.target import Target
from tests.smtp_client import RawClient
from tests.waiting import eventually, wait_until

ZONE = """
fail.test. 60 IN TXT "v=spf1 -all"
pass.test. 60 IN TXT "v=spf1 ip4:127.0.0.1 -all"
soft.test. 60 IN TXT "v=spf1 ~all"
nospf.test. 60 IN A 192.0.2.10
"""


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer(ZONE).start()
    yield server
    server.stop()


@pytest.fixture
def sender_side() -> Iterator[Target]:
    server = Target().start()
    yield server
    server.stop()


def _send(node: Spooler, sender: str) -> str:
    """One message from 127.0.0.1; its queue id."""
    client = RawClient(node.port)
    try:
        client.reply()
        assert client.command("EHLO client.test")[0] == 250
        assert client.command(f"MAIL FROM:<{sender}>")[0] == 250
        assert client.command("RCPT TO:<user@example.test>")[0] == 250
        assert client.command("DATA")[0] == 354
        code, text = client.command(b"Subject: spf\r\n\r\nbody\r\n.")
        assert code == 250, text
        return text.rsplit(" ", 1)[-1]
    finally:
        client.close()


def _tags(node: Spooler, queue_id: str) -> list[str]:
    # Read from the spool file (a CLI call per poll would cost a second each).
    with contextlib.closing(sqlite3.connect(node.db, timeout=10)) as conn:
        (tags,) = conn.execute("SELECT tags FROM messages WHERE id = ?", (queue_id,)).fetchone()
    return [tag for tag in str(tags).split(",") if tag]


def _spf_tag(node: Spooler, queue_id: str, within: float = 15.0) -> str:
    """The spf= tag once recorded (it may follow the commit by the check's own time)."""
    found = wait_until(
        lambda: [tag for tag in _tags(node, queue_id) if tag.startswith("spf=")],
        within=within,
        what=f"an spf= tag on {queue_id}",
    )
    assert len(found) == 1, (queue_id, found)
    return found[0]


@pytest.mark.slow  # about ten seconds, most of it starting CLI processes
def test_spf_result_recorded_and_fail_withholds_the_bounce(
    spooler_factory: Any, dns: DnsServer, sender_side: Target
) -> None:
    node: Spooler = spooler_factory(
        smtp={"spf_check_private": True}, delivery={"resolver": dns.address}
    )
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--tls", "off", "--hold")
    # The senders' domains route to a test server, so a DSN would really be sent there.
    for name in ("fail.test", "pass.test"):
        node.cli("domain", "add", name, "--route", f"127.0.0.1:{sender_side.port}", "--tls", "off")
    node.start()
    sent = {result: _send(node, f"someone@{result}.test") for result in ("fail", "pass", "soft")}
    sent["none"] = _send(node, "someone@nospf.test")
    expected = {"fail": "spf=fail", "pass": "spf=pass", "soft": "spf=softfail", "none": "spf=none"}
    for key, queue_id in sent.items():
        assert _spf_tag(node, queue_id) == expected[key]
    assert "spf=fail" in node.cli("queue", "show", sent["fail"]).stdout  # the message view

    withheld = node.cli("queue", "bounce", sent["fail"])
    assert "NOT sent" in withheld.stdout and "SPF fail at arrival" in withheld.stdout
    assert f"--force {sent['fail']}" in withheld.stdout
    assert sender_side.recorder.received == []

    # Positive control: the passing sender's DSN goes to the same server, without --force.
    ok = json.loads(node.cli("queue", "bounce", sent["pass"], "--json").stdout)
    assert ok["sent"] is True and ok["withheld"] is None
    assert [r.rcpt_tos for r in sender_side.recorder.received] == [["someone@pass.test"]]

    forced = json.loads(node.cli("queue", "bounce", "--force", sent["fail"], "--json").stdout)
    assert forced["sent"] is True and forced["forced"] is True
    assert sender_side.recorder.received[-1].rcpt_tos == ["someone@fail.test"]


def test_internal_clients_are_not_checked(spooler_factory: Any, dns: DnsServer) -> None:
    # Without spf_check_private a loopback client is an internal relay: no check, no tag (and
    # no DNS traffic: benchmarks over 127.0.0.1 are unaffected).
    node: Spooler = spooler_factory(delivery={"resolver": dns.address})
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--tls", "off", "--hold")
    node.start()
    queue_id = _send(node, "someone@fail.test")
    # Positive control: a node that does check loopback clients, started and sent to after the
    # message above, records its result; a check of the first node would have answered by now.
    checking: Spooler = spooler_factory(
        smtp={"spf_check_private": True}, delivery={"resolver": dns.address}
    )
    checking.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--hold")
    checking.start()
    assert _spf_tag(checking, _send(checking, "someone@fail.test")) == "spf=fail"
    assert not [tag for tag in _tags(node, queue_id) if tag.startswith("spf=")]


# -- the checker in-process ------------------------------------------------------------------


async def test_checker_results_cache_and_bounds(dns: DnsServer) -> None:
    checker = SpfChecker(resolver=dns.address, check_private=True, timeout=1.0)
    try:
        check = checker.start("127.0.0.1", "x@fail.test", "client.test")
        assert check is not None
        assert await asyncio.wrap_future(check.future) == "fail"
        assert check.tags() == ("spf=fail",)
        dns.stop()  # cached for a minute: no DNS needed for the same client and sender
        again = checker.start("127.0.0.1", "x@fail.test", "client.test")
        assert again is not None and again.tags() == ("spf=fail",)
        unreachable = checker.start("127.0.0.1", "x@pass.test", "client.test")
        assert unreachable is not None
        assert await asyncio.wrap_future(unreachable.future) == "temperror"
    finally:
        checker.close()
    # Nothing to check: the null sender; an internal client unless spf_check_private.
    internal = SpfChecker(resolver=dns.address)
    try:
        assert internal.start("127.0.0.1", "x@fail.test", "h") is None
        assert internal.start("10.1.2.3", "x@fail.test", "h") is None
        assert internal.start("203.0.113.5", "", "h") is None
    finally:
        internal.close()
    # More checks in flight than allowed: temperror at once, never an unbounded queue.
    full = SpfChecker(resolver=dns.address, check_private=True, max_in_flight=0)
    try:
        busy = full.start("127.0.0.1", "y@fail.test", "h")
        assert busy is not None and busy.tags() == ("spf=temperror",)
    finally:
        full.close()


class GatedResolver(ZoneResolver):
    """Answers only once ``gate`` is open (at most 10 s), counting the questions per name
    (the checker's resolver caches answers: a name is asked once, however many checks)."""

    def __init__(self, zone: str) -> None:
        super().__init__(zone)
        self.gate = threading.Event()
        self.asked: Counter[str] = Counter()
        self._lock = threading.Lock()

    def resolve(self, request: Any, handler: Any) -> Any:
        with self._lock:
            self.asked[str(request.q.qname)] += 1
        self.gate.wait(10)
        return super().resolve(request, handler)


async def test_same_sender_from_same_client_is_checked_once_at_a_time() -> None:
    """A bulk sender's parallel sessions (one client, one sender) share the check in flight,
    and one of them ending its transaction does not cancel the check the others wait for."""
    resolver = GatedResolver(ZONE)
    with DnsServer(ZONE, resolver) as dns:
        checker = SpfChecker(resolver=dns.address, check_private=True, timeout=5.0, workers=1)
        try:
            # The only worker is busy with the first check (its DNS answer is held back), so
            # every later check waits in the queue: cancellable.
            started = [checker.start("127.0.0.1", "x@fail.test", "h") for _ in range(5)]
            other = checker.start("127.0.0.1", "x@soft.test", "h")  # another sender: its own
            both = [checker.start("127.0.0.2", "y@fail.test", "h") for _ in range(2)]
            alone = checker.start("127.0.0.3", "z@fail.test", "h")
            first = [c for c in started if c is not None]
            queued = [c for c in both if c is not None]
            assert len(first) == 5 and len(queued) == 2 and other is not None and alone is not None
            assert all(c.future is first[0].future for c in first)
            assert other.future is not first[0].future
            assert queued[0].future is queued[1].future
            queued[0].cancel()  # the other transaction still waits for it: not cancelled
            alone.cancel()  # positive control: nobody else waits, the queued check is dropped
            assert alone.future.cancelled() and not queued[1].future.cancelled()
            resolver.gate.set()
            results = [await asyncio.wrap_future(c.future) for c in first]
            assert results == ["fail"] * 5
            assert await asyncio.wrap_future(other.future) == "softfail"
            assert await asyncio.wrap_future(queued[1].future) == "fail"
            assert alone.tags() == ("spf=temperror",)
            assert resolver.asked["soft.test."] == 1  # the other sender's own check ran
        finally:
            resolver.gate.set()
            checker.close()


async def test_result_after_the_commit_is_tagged_when_it_comes(tmp_path: Path) -> None:
    store = SqliteStore(f"sqlite:///{tmp_path / 'spool.db'}")
    await store.open()
    try:
        body = BodyBuffer(1 << 20)
        body.write(b"Subject: x\r\n\r\nbody\r\n")
        future: concurrent.futures.Future[str] = concurrent.futures.Future()
        check = SpfCheck(future)
        assert check.tags() == ()  # not done at the end of DATA: the commit does not wait
        await store.accept_message(
            IncomingMessage(
                id="late1",
                envelope=Envelope("x@fail.test", MailParams(), (Recipient("user@example.test"),)),
                client=ClientInfo("203.0.113.5", "client.test"),
                received_at=time.time(),
                message_id=None,
                body=body,
            )
        )
        check.settle(store, "late1")
        future.set_result("fail")

        async def tagged() -> StoredMessage | None:
            message = await store.get_message("late1")
            assert message is not None
            return message if "spf=fail" in message.tags else None

        message = await eventually(tagged, within=10, what="the late spf=fail tag")
        assert message.tags == ("spf=fail",)
    finally:
        await store.close()
