"""queue bounce never sends a DSN to an address literal, to a domain that resolves only to
non-public addresses (loopback, private, reserved: also after DNS rebinding), or to a sender
whose SPF failed at arrival, unless forced (issue 14 item 4).

The "nothing was sent" checks use a real SMTP server on the very address and port the DSN would
go to (127.x.y.z:25: a literal or an MX always means port 25), and each is paired with the
forced bounce that reaches that same server.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Iterator

import pytest

from mxspool import operations as ops
from mxspool.config import Config
from mxspool.delivery.bounce import PublicOnly, bounce_message, public_address
from mxspool.delivery.errors import ConnectFailed
from mxspool.delivery.routing import Hop
from mxspool.delivery.transport import Session
from mxspool.store.base import Route, TlsMode
from mxspool.store.sqlite import SqliteStore
from tests.delivery.conftest import DOMAIN, add_domain, put_message, rows
from tests.delivery.dnsserver import DnsServer
from tests.delivery.target import Recorder, Target, _Controller


class Port25Target:
    """The recording aiosmtpd server on a random 127.x.y.z, port 25 (needs root)."""

    def __init__(self) -> None:
        rng = random.Random()
        self.address = f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        self.recorder = Recorder()
        self.controller = _Controller(
            self.recorder, hostname=self.address, port=25, decode_data=False
        )


@pytest.fixture
def port25() -> Iterator[Port25Target]:
    server = Port25Target()
    try:
        server.controller.start()
    except (PermissionError, OSError) as exc:
        if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EADDRINUSE):
            pytest.skip(f"cannot listen on {server.address}:25 ({exc}); run as root")
        raise
    server.recorder.reset_counters()
    yield server
    server.controller.stop()


def _config(resolver: str = "") -> Config:
    return Config.model_validate(
        {
            "smtp": {"hostname": "mx.test.local"},
            "delivery": {"resolver": resolver, "connect_timeout": "5s"},
        }
    )


async def _states(store: SqliteStore) -> dict[str, str]:
    return {row.rcpt: row.state for row in await rows(store)}


async def _last_audit(store: SqliteStore) -> str:
    (entry,) = [e for e in await store.list_audit(10) if e.action == "queue.bounce"][:1]
    return entry.detail


async def test_literal_sender_withheld_then_forced(
    store: SqliteStore, port25: Port25Target
) -> None:
    await add_domain(store, 1, hold=True)
    sender = f"victim@[{port25.address}]"
    queue_id, _ = await put_message(store, [f"a@{DOMAIN}"], mail_from=sender)

    result = await ops.queue_bounce(store, _config(), queue_id)
    assert not result.sent and result.reply is None
    assert "address literal" in result.withheld
    assert port25.recorder.sessions == 0 and port25.recorder.received == []
    # The operator asked to give up on the message: its recipients are bounced anyway.
    assert await _states(store) == {f"a@{DOMAIN}": "bounced"}
    assert "dsn_withheld" in await _last_audit(store)
    assert "address literal" in await _last_audit(store)
    message = await store.get_message(queue_id)
    assert message is not None and "dsn=withheld" in message.tags
    assert "no DSN sent" in (message.recipients[0].last_reply or "")

    # Positive control, same server: --force sends the withheld DSN there.
    forced = await ops.queue_bounce(store, _config(), queue_id, force=True)
    assert forced.sent and forced.forced and forced.reported == 1
    (received,) = port25.recorder.received
    assert received.rcpt_tos == [sender]
    assert f"Final-Recipient: rfc822; a@{DOMAIN}" in received.data.decode()
    assert "forced" in await _last_audit(store)
    # Sent once: a second --force has nothing left to report.
    with pytest.raises(ops.OperationError, match="no undelivered recipient"):
        await ops.queue_bounce(store, _config(), queue_id, force=True)
    assert len(port25.recorder.received) == 1


async def test_domain_resolving_to_loopback_withheld_then_forced(
    store: SqliteStore, port25: Port25Target
) -> None:
    # The sender's domain is re-pointed at a loopback address (DNS rebinding, or a hostile
    # domain): the text of the address is harmless, the resolved address is not.
    dns = DnsServer(
        f"rebind.test. 60 IN MX 10 mx.rebind.test.\nmx.rebind.test. 60 IN A {port25.address}\n"
        f"implicit.test. 60 IN A {port25.address}\n"
    ).start()
    try:
        await add_domain(store, 1, hold=True)
        first, _ = await put_message(store, [f"a@{DOMAIN}"], mail_from="victim@rebind.test")
        second, _ = await put_message(store, [f"b@{DOMAIN}"], mail_from="victim@implicit.test")
        config = _config(dns.address)
        for queue_id, domain in ((first, "rebind.test"), (second, "implicit.test")):
            result = await ops.queue_bounce(store, config, queue_id)
            assert not result.sent
            assert f"{domain} resolves only to addresses that are not public" in result.withheld
            assert port25.address in result.withheld
        assert port25.recorder.sessions == 0 and port25.recorder.received == []
        assert set((await _states(store)).values()) == {"bounced"}

        forced = await ops.queue_bounce(store, config, first, force=True)
        assert forced.sent
    finally:
        dns.stop()
    (received,) = port25.recorder.received
    assert received.rcpt_tos == ["victim@rebind.test"]
    assert received.mail_from in ("", "<>")


class RecordingConnector:
    """Records the hops it is asked to open and connects nowhere."""

    def __init__(self) -> None:
        self.hops: list[Hop] = []

    async def open(self, hop: Hop, tls: TlsMode) -> Session:
        self.hops.append(hop)
        raise ConnectFailed(f"{hop}: the test connects nowhere")


async def test_public_addresses_pass_the_check(store: SqliteStore) -> None:
    # MX 10 points at loopback, MX 20 at a public address: only the public one is tried.
    dns = DnsServer(
        "pub.test. 60 IN MX 10 inside.pub.test.\npub.test. 60 IN MX 20 outside.pub.test.\n"
        "inside.pub.test. 60 IN A 127.0.0.1\noutside.pub.test. 60 IN A 8.8.8.8\n"
    ).start()
    try:
        await add_domain(store, 1, hold=True)
        queue_id, _ = await put_message(store, [f"a@{DOMAIN}"], mail_from="someone@pub.test")
        connector = RecordingConnector()
        with pytest.raises(Exception, match="the test connects nowhere"):
            await bounce_message(_config(dns.address), store, queue_id, connector=connector)
    finally:
        dns.stop()
    assert [hop.address for hop in connector.hops] == ["8.8.8.8"]
    # A failed send leaves the message as it was.
    assert await _states(store) == {f"a@{DOMAIN}": "held"}


async def test_the_check_is_at_connect_time() -> None:
    inner = RecordingConnector()
    guarded = PublicOnly(inner)
    for address in ("127.0.0.1", "10.0.0.1", "::ffff:127.0.0.1"):
        with pytest.raises(ConnectFailed, match="not a public address"):
            await guarded.open(Hop("mx.example", address, 25), TlsMode.OFF)
    assert inner.hops == []
    with pytest.raises(ConnectFailed, match="connects nowhere"):
        await guarded.open(Hop("mx.example", "8.8.8.8", 25), TlsMode.OFF)
    assert [hop.address for hop in inner.hops] == ["8.8.8.8"]


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("127.0.0.1", False),
        ("127.9.8.7", False),
        ("0.0.0.0", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("192.0.2.1", False),  # documentation
        ("224.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("2002:7f00:1::1", False),  # 6to4 around 127.0.0.1
        ("mx.example.com", False),  # a name is never taken for an address
        ("8.8.8.8", True),
        ("[8.8.8.8]", True),
        ("2606:4700:4700::1111", True),
    ],
)
def test_public_address(address: str, public: bool) -> None:
    assert public_address(address) is public


async def test_spf_fail_withheld_then_forced(store: SqliteStore) -> None:
    # The sender's domain is one of ours, routed to a test server: a DSN goes there without
    # --force (the operator chose that route) unless the sender failed SPF at arrival.
    target = Target().start()
    try:
        await add_domain(store, 1, hold=True)
        await add_domain(
            store, target.port, name="src.test", routes=(Route("127.0.0.1", target.port),)
        )
        clean, _ = await put_message(store, [f"a@{DOMAIN}"], mail_from="good@src.test")
        forged, _ = await put_message(store, [f"b@{DOMAIN}"], mail_from="forged@src.test")
        await store.add_tag(forged, "spf=fail")

        result = await ops.queue_bounce(store, _config(), forged)
        assert not result.sent
        assert result.withheld.startswith("SPF fail at arrival")
        assert target.recorder.received == []

        sent = await ops.queue_bounce(store, _config(), clean)  # positive control, no --force
        assert sent.sent and not sent.forced
        assert [r.rcpt_tos for r in target.recorder.received] == [["good@src.test"]]

        forced = await ops.queue_bounce(store, _config(), forged, force=True)
        assert forced.sent
        assert [r.rcpt_tos for r in target.recorder.received][-1] == ["forged@src.test"]
    finally:
        target.stop()
