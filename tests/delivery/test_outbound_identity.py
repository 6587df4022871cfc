"""Outbound identity (issue 11, point 5): source address, address family, client certificate.

Real SMTP to local targets on 127.0.0.1 and ::1 (tests/delivery/identity_target.py), names from
a local dnslib server, certificates from a trustme CA (built on ``cryptography``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mxspool import service
from mxspool.config import Config, DeliveryConfig, SmtpConfig, StoreConfig
from mxspool.delivery.dnscache import DnsCache
from mxspool.delivery.errors import RoutingError, TlsFailed
from mxspool.delivery.identity import IdentityError, outbound_identity
from mxspool.delivery.routing import Hop, Router
from mxspool.delivery.scheduler import Scheduler
from mxspool.delivery.smtpclient import SmtpConnector
from mxspool.delivery.transport import Transaction
from mxspool.envelope import MailParams, RcptParams, Recipient
from mxspool.store.base import Domain, DomainMode, Route, TlsMode
from mxspool.store.sqlite import SqliteStore
from tests.delivery.conftest import put_message
from tests.delivery.dnsserver import DnsServer
from tests.delivery.identity_target import IdentityTarget
from tests.migrate.conftest import Cli, write_config
from tests.waiting import eventually

CLIENT_NAME = "spooler.mx.test"
ZONE = """
dual.test. 300 IN A 127.0.0.1
dual.test. 300 IN AAAA ::1
v6only.test. 300 IN AAAA ::1
mx.target.test. 300 IN A 127.0.0.1
example.test. 300 IN MX 10 mx.target.test.
"""


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    server = DnsServer(ZONE).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def client_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(cert, key) of the spooler's client certificate, issued by ``ca``."""
    folder = tmp_path_factory.mktemp("client")
    leaf = ca.issue_cert(CLIENT_NAME, common_name=CLIENT_NAME)
    cert, key = folder / "client.pem", folder / "client.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return str(cert), str(key)


def server_tls(ca: trustme.CA, verify: ssl.VerifyMode) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.target.test", "127.0.0.1").configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = verify
    return context


@pytest.fixture
def v4_target() -> Iterator[IdentityTarget]:
    target = IdentityTarget("127.0.0.1").start()
    yield target
    target.stop()


def _tx(rcpt: str = "user@example.test") -> Transaction:
    data = b"Subject: hi\r\n\r\nhello\r\n"

    async def body() -> AsyncIterator[bytes]:
        yield data

    return Transaction(
        "sender@src.test",
        MailParams(size=len(data)),
        (Recipient(rcpt, RcptParams()),),
        len(data),
        body,
    )


def _config(tmp_path: Path, **delivery: object) -> Config:
    return Config(
        # No arrival verdicts to wait for: put_message stores mail as the intake would, minus
        # the authentication checks (the release gate would hold it for their timeout).
        smtp=SmtpConfig(hostname="mx.test.local", authentication=False),
        store=StoreConfig(url=f"sqlite:///{tmp_path / 'spool.db'}"),
        delivery=DeliveryConfig.model_validate({"connect_timeout": "5s", **delivery}),
    )


async def _deliver_with(config: Config, store: SqliteStore, target: IdentityTarget) -> None:
    """Run the real scheduler (Scheduler.from_config) until the target got one more message."""
    before = sum(seen.messages for seen in target.sessions)
    await put_message(store, ["user@example.test"])
    scheduler = Scheduler.from_config(config, store)
    task = asyncio.create_task(scheduler.run())
    try:
        await eventually(
            lambda: sum(seen.messages for seen in target.sessions) > before, 15.0, "delivery"
        )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_source_address_is_what_the_target_sees(
    tmp_path: Path, store: SqliteStore, v4_target: IdentityTarget
) -> None:
    await store.add_domain(
        Domain(
            name="example.test",
            mode=DomainMode.RELAY,
            routes=(Route("127.0.0.1", v4_target.port),),
            tls=TlsMode.OFF,
        )
    )
    # Positive control: without source_address the system picks 127.0.0.1.
    await _deliver_with(_config(tmp_path), store, v4_target)
    assert v4_target.peers[-1] == "127.0.0.1"
    # Linux routes all of 127/8 to lo, so 127.0.0.2 can be bound: the target sees it.
    await _deliver_with(_config(tmp_path, source_address=["127.0.0.2"]), store, v4_target)
    assert v4_target.peers[-1] == "127.0.0.2"


async def test_address_family_picks_the_version(dns: DnsServer, tmp_path: Path) -> None:
    v4 = IdentityTarget("127.0.0.1").start()
    v6 = IdentityTarget("::1")
    v6.port = v4.port  # the same name and port, one listener per address family
    v6.start()
    domain = Domain(
        "dual.test", DomainMode.RELAY, routes=(Route("dual.test", v4.port),), tls=TlsMode.OFF
    )
    try:
        for family, expected in (("any", ["127.0.0.1", "::1"]), ("ipv4", ["127.0.0.1"])):
            identity = outbound_identity(DeliveryConfig(address_family=family))  # type: ignore[arg-type]
            hops = await Router(DnsCache(dns.address), identity).hops(domain)
            assert [hop.address for hop in hops] == expected, family
        identity = outbound_identity(DeliveryConfig(address_family="ipv6"))
        [hop] = await Router(DnsCache(dns.address), identity).hops(domain)
        assert hop.address == "::1"
        for chosen, target in ((hop, v6), (Hop("dual.test", "127.0.0.1", v4.port), v4)):
            connector = SmtpConnector(
                local_hostname="mx.test.local", connect_timeout=5.0, identity=identity
            )
            session = await connector.open(chosen, TlsMode.OFF)
            [reply] = await session.send(_tx())
            await session.close()
            assert reply.code == 250
            assert target.peers == [chosen.address]  # the ::1 target saw ::1, and only it
        # The exchange-online profile narrows "any" to IPv4 (its connector lists IPv4)...
        exo = dataclasses.replace(domain, profile="exchange-online")
        any_family = outbound_identity(DeliveryConfig())
        hops = await Router(DnsCache(dns.address), any_family).hops(exo)
        assert [hop.address for hop in hops] == ["127.0.0.1"]
        # ... and with address_family = "ipv6" leaves nothing: a deferral that says why.
        with pytest.raises(RoutingError, match="IPv4 only") as refused:
            await Router(DnsCache(dns.address), identity).hops(exo)
        assert not refused.value.permanent
        # A host without an address of the allowed family: deferred, with the reason.
        only6 = Domain(
            "v6only.test", DomainMode.RELAY, routes=(Route("v6only.test", 25),), tls=TlsMode.OFF
        )
        ipv4 = outbound_identity(DeliveryConfig(address_family="ipv4"))
        with pytest.raises(RoutingError, match="no IPv4 address") as deferred:
            await Router(DnsCache(dns.address), ipv4).hops(only6)
        assert not deferred.value.permanent
        [hop6] = await Router(DnsCache(dns.address), any_family).hops(only6)  # control
        assert hop6.address == "::1"
    finally:
        v4.stop()
        v6.stop()


async def test_client_certificate_is_presented_on_starttls(
    ca: trustme.CA, client_files: tuple[str, str]
) -> None:
    cert, key = client_files
    with_cert = outbound_identity(DeliveryConfig(tls_client_cert=cert, tls_client_key=key))
    optional = IdentityTarget(tls=server_tls(ca, ssl.CERT_OPTIONAL)).start()
    required = IdentityTarget(tls=server_tls(ca, ssl.CERT_REQUIRED)).start()
    try:
        for target, identity in ((optional, None), (optional, with_cert), (required, with_cert)):
            connector = SmtpConnector(
                local_hostname="mx.test.local",
                connect_timeout=5.0,
                **({"identity": identity} if identity else {}),  # type: ignore[arg-type]
            )
            session = await connector.open(Hop("t", "127.0.0.1", target.port), TlsMode.REQUIRE)
            [reply] = await session.send(_tx())
            await session.close()
            assert reply.code == 250
        # Control: without a certificate the target saw none; with it, the subject.
        assert [(s.tls, s.client_subject) for s in optional.sessions] == [
            (True, ""),
            (True, CLIENT_NAME),
        ]
        assert [s.client_subject for s in required.sessions] == [CLIENT_NAME]
        # A target that requires a certificate refuses a client without one.
        bare = SmtpConnector(local_hostname="mx.test.local", connect_timeout=5.0)
        with pytest.raises(TlsFailed):
            session = await bare.open(Hop("t", "127.0.0.1", required.port), TlsMode.REQUIRE)
            await session.send(_tx())
    finally:
        optional.stop()
        required.stop()


def test_bad_identity_is_a_clear_start_error(
    tmp_path: Path, client_files: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = client_files
    other = tmp_path / "other.key"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cases = [
        ({"tls_client_cert": cert, "tls_client_key": str(tmp_path / "missing.key")}, "cannot read"),
        ({"tls_client_cert": cert, "tls_client_key": str(other)}, "does not match"),
        ({"source_address": ["192.0.2.1"]}, "is not an address of this machine"),
    ]
    for settings, message in cases:
        with pytest.raises(IdentityError, match=message):
            outbound_identity(DeliveryConfig.model_validate(settings))
    # Control: the good pair and a local address pass.
    good = outbound_identity(
        DeliveryConfig(tls_client_cert=cert, tls_client_key=key, source_address=["127.0.0.2"])
    )
    assert good.client_cert is not None and good.client_cert.name == CLIENT_NAME
    # `mxspool serve` refuses to start with the bad key, saying which key and what to do.
    config = _config(tmp_path, tls_client_cert=cert, tls_client_key=str(other))
    assert service.serve(config) == 2
    assert "tls_client_key" in caplog.text and "does not match" in caplog.text


def test_check_route_and_runbook_name_address_and_certificate(
    tmp_path: Path, dns: DnsServer, ca: trustme.CA, client_files: tuple[str, str]
) -> None:
    cert, key = client_files
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    target = IdentityTarget(tls=server_tls(ca, ssl.CERT_REQUIRED)).start()
    try:
        delivery = {"resolver": dns.address, "ca_file": str(ca_file), "connect_timeout": "5s"}
        (tmp_path / "plain").mkdir()
        (tmp_path / "identity").mkdir()
        plain = Cli(write_config(tmp_path / "plain", delivery=delivery))
        with_identity = {
            **delivery,
            "source_address": ["127.0.0.2"],
            "tls_client_cert": cert,
            "tls_client_key": key,
        }
        cli = Cli(write_config(tmp_path / "identity", delivery=with_identity))
        for each in (plain, cli):
            each("domain", "add", "example.test", "--route", f"mx.target.test:{target.port}")
        # Control: no identity configured: the system's address, no certificate: the target
        # requires one, so TLS fails and the route is a no-go.
        data = json.loads(plain("check", "route", "example.test", "--json", code=1).stdout)
        [hop] = data["hops"]
        assert hop["local_address"] == "127.0.0.1" and hop["client_cert"] is None
        data = json.loads(cli("check", "route", "example.test", "--json").stdout)
        [hop] = data["hops"]
        assert (hop["local_address"], hop["family"]) == ("127.0.0.2", "IPv4")
        assert hop["client_cert"]["subject"] == CLIENT_NAME and hop["client_cert"]["presented"]
        assert hop["client_cert"]["not_after"] > time.strftime("%Y-%m-%d")
        assert target.sessions[-1].client_subject == CLIENT_NAME
        assert target.sessions[-1].peer == "127.0.0.2"
        table = cli("check", "route", "example.test").output
        assert "127.0.0.2 (IPv4)" in table and f"CN={CLIENT_NAME}" in table
        # The runbook's connector recognises the spooler by the certificate's name...
        args = ["runbook", "example.test", "--spooler-host", CLIENT_NAME]
        text = cli(*args, "--spooler-ip", "203.0.113.5").stdout
        assert f"-TlsSenderCertificateName '{CLIENT_NAME}'" in text
        assert "-RestrictDomainsToCertificate $true" in text and "-SenderIPAddresses" not in text
        # ... and by IP address without one (control).
        text = plain(*args, "--spooler-ip", "203.0.113.5").stdout
        assert "-SenderIPAddresses '203.0.113.5'" in text and "TlsSenderCertificateName" not in text
    finally:
        target.stop()
