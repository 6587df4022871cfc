"""ACME end to end: a real `mxspool serve` gets its STARTTLS certificate from Debian's pebble.

Pebble really validates (PEBBLE_VA_ALWAYS_VALID=0): for HTTP-01 its VA resolves the host name
through the test's DNS server (A 127.0.0.1) and fetches the token from mxspool's HTTP-01
listener; for DNS-01 it queries the TXT record the hook script published. An SMTP client then
sees the pebble-issued certificate (issuer: pebble's intermediate, chain verified against
pebble's root); a forced renewal reaches new connections while a session already in TLS goes
on. Needs the Debian package `pebble`; skips without it unless MXSPOOL_REQUIRE_PEBBLE=1 (CI).
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Spooler, free_port
from tests.e2e.acme_env import PEBBLE, ChallengeDns, Pebble, write_hook
from tests.e2e.tls_client import served_serial, starttls
from tests.waiting import wait_until

HOSTNAME = "mx.acme.test"

if not shutil.which(PEBBLE) and os.environ.get("MXSPOOL_REQUIRE_PEBBLE") != "1":
    pytest.skip("pebble is not installed (apt-get install pebble)", allow_module_level=True)


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChallengeDns]:
    server = ChallengeDns([HOSTNAME], tmp_path_factory.mktemp("dns") / "txt")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory, dns: ChallengeDns) -> Iterator[Pebble]:
    server = Pebble(tmp_path_factory.mktemp("pebble"), dns.port)
    yield server
    server.stop()


def acme_section(pebble: Pebble, **extra: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "directory": pebble.directory,
        "ca_file": str(pebble.api_ca),
        "email": "postmaster@acme.test",
        "http_listen": f"127.0.0.1:{pebble.http_port}",
        **extra,
    }


def start(spooler_factory: Any, pebble: Pebble, **acme: Any) -> Spooler:
    node: Spooler = spooler_factory(
        smtp={"hostname": HOSTNAME, "tls_reload_interval": "0.2s"},
        acme=acme_section(pebble, **acme),
    )
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:9", "--tls", "off", "--hold")
    node.start()
    return node


def test_serve_obtains_renews_and_serves_the_new_certificate(
    spooler_factory: Any, pebble: Pebble
) -> None:
    node = start(spooler_factory, pebble)
    root = str(pebble.root_ca_file())
    # Obtained at start in the background: STARTTLS is offered once it is in place.
    first = wait_until(lambda: served_serial(node.port), 30, "a certificate from pebble")
    session = starttls(node.port, cafile=root, server_hostname=HOSTNAME)  # chain + name verify
    assert session.cert.serial_number == first
    assert session.cert.issuer.rfc4514_string() == pebble.intermediate_subject()
    assert "Pebble Intermediate CA" in session.cert.issuer.rfc4514_string()
    key = (node.root / "data" / "acme" / "live" / "privkey.pem").resolve()
    assert key.stat().st_mode & 0o777 == 0o600
    assert "ACME: installed certificate serial" in node.log.read_text()

    # Not due yet: `acme issue` does nothing; --force orders a new one, which a running server
    # serves to new connections within its poll interval.
    quiet = node.cli("acme", "issue")
    assert "nothing to do" in quiet.stdout
    forced = node.cli("acme", "issue", "--force", "--json")
    renewed = int(json.loads(forced.stdout)["serial"], 16)
    assert renewed != first
    wait_until(lambda: served_serial(node.port) == renewed, 10, "the renewed certificate served")
    fresh = starttls(node.port, cafile=root, server_hostname=HOSTNAME)
    assert fresh.cert.serial_number == renewed
    fresh.close()

    # The session that was already encrypted goes on, on its old certificate, to a 250.
    assert session.command("MAIL FROM:<a@src.test>").startswith("250")
    assert session.command("RCPT TO:<b@example.test>").startswith("250")
    assert session.command("DATA").startswith("354")
    assert session.command("Subject: after renewal\r\n\r\nbody\r\n.").startswith("250")
    session.close()
    assert node.domain_status("example.test")["held"] == 1


def test_serve_renews_ahead_of_expiry_on_its_own(spooler_factory: Any, pebble: Pebble) -> None:
    # renew_before longer than pebble's 90 days: every check finds the certificate due.
    node = start(spooler_factory, pebble, renew_before="100d", check_interval="1s")
    first = wait_until(lambda: served_serial(node.port), 30, "a certificate from pebble")
    wait_until(lambda: served_serial(node.port) not in (None, first), 30, "a renewal by the server")
    assert node.log.read_text().count("ACME: a new certificate is needed") >= 2


def test_serve_survives_an_unreachable_ca_and_keeps_smtp(spooler_factory: Any) -> None:
    # Positive control for "never crash serve": nothing listens at the directory URL.
    node: Spooler = spooler_factory(
        smtp={"hostname": HOSTNAME},
        acme={
            "enabled": True,
            "directory": f"https://127.0.0.1:{free_port()}/dir",
            "retry_after": "1s",
            # never bound here (no order reaches a challenge), but loopback all the same
            "http_listen": f"127.0.0.1:{free_port()}",
        },
    )
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:9", "--tls", "off", "--hold")
    node.start()
    wait_until(lambda: node.log.read_text().count("ACME: could not obtain") >= 2, 15, "retries")
    assert "retrying in 2 s" in node.log.read_text()  # the backoff doubles
    with smtplib.SMTP("127.0.0.1", node.port, timeout=10) as client:
        client.ehlo("client.test")
        assert not client.has_extn("starttls")  # no certificate: not offered, not broken
        assert not client.sendmail("a@src.test", ["b@example.test"], b"Subject: x\r\n\r\ny\r\n")
    assert node.proc is not None and node.proc.poll() is None


def test_dns01_through_the_hook(tmp_path: Path, pebble: Pebble, dns: ChallengeDns) -> None:
    calls = tmp_path / "hook-calls.txt"
    hook = write_hook(tmp_path / "hook.sh", dns.txt_dir, calls)
    node = Spooler(
        tmp_path,
        smtp={"hostname": HOSTNAME},
        acme=acme_section(
            pebble,
            challenge="dns-01",
            dns_hook=str(hook),
            http_listen=f"127.0.0.1:{free_port()}",  # nothing answers HTTP-01 here
        ),
    )
    result = node.cli("acme", "issue", "--json")
    issued = json.loads(result.stdout)
    assert issued["names"] == [HOSTNAME]
    assert "Pebble Intermediate CA" in issued["issuer"]
    lines = calls.read_text().splitlines()
    record = f"_acme-challenge.{HOSTNAME}"
    assert [line.split()[:2] for line in lines] == [["set", record], ["clear", record]]
    assert not (dns.txt_dir / record).exists()  # cleared after the order
    check = node.cli("check", "tls", "--json")
    assert json.loads(check.stdout)["covers_hostname"] is True

    # The validation is real: a hook that publishes a wrong value makes the order fail, and
    # a failing hook is reported with its stderr.
    liar = write_hook(
        tmp_path / "liar.sh",
        dns.txt_dir,
        calls,
        body='#!/bin/sh\n[ "$1" = set ] && echo wrong-value >> "{txt_dir}/$2"; exit 0\n',
    )
    failing = write_hook(
        tmp_path / "fail.sh",
        dns.txt_dir,
        calls,
        body="#!/bin/sh\necho 'zone API: 403 forbidden' >&2\nexit 3\n",
    )
    for bad, expected in ((liar, "could not validate"), (failing, "403 forbidden")):
        (tmp_path / bad.stem).mkdir()
        other = Spooler(
            tmp_path / bad.stem,
            smtp={"hostname": HOSTNAME},
            acme=acme_section(pebble, challenge="dns-01", dns_hook=str(bad)),
        )
        refused = other.cli("acme", "issue", check=False)
        assert refused.returncode == 1, refused.stderr
        assert expected in refused.stderr
        assert not (tmp_path / bad.stem / "data" / "acme" / "live").exists()
