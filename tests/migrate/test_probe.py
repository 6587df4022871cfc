"""``mxspool probe`` end to end: a running `mxspool serve`, relaying to an aiosmtpd target."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.delivery.target import Target

DOMAIN = "example.test"


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target().start()
    yield server
    server.stop()


def test_probe_in_relay_mode_is_delivered_and_tagged(spooler_factory: Any, target: Target) -> None:
    node = spooler_factory()
    node.cli("domain", "add", DOMAIN, "--route", f"127.0.0.1:{target.port}", "--tls", "off")
    node.start()
    result = node.cli("probe", DOMAIN, "--to", f"alice@{DOMAIN}", "--json", "--wait", "20s")
    data = json.loads(result.stdout)
    assert data["accepted"].startswith("250 2.0.0 Ok: queued as ")
    assert data["stored"] is True and data["state"] == "delivered", data
    assert data["remote_reply"].startswith("250 2.0.0 Ok: queued as T")
    # What the target got is the marked message, with the null reverse-path.
    [received] = target.recorder.received
    assert received.mail_from in ("", "<>") and received.rcpt_tos == [f"alice@{DOMAIN}"]
    assert f"X-Mxspool-Probe: {data['token']}".encode() in received.data
    # Listed as probes; an ordinary message is not.
    tagged = json.loads(node.cli("queue", "list", "--tag", "probe", "--json").stdout)
    assert [entry["id"] for entry in tagged] == [data["id"]]
    shown = json.loads(node.cli("queue", "show", data["id"], "--json").stdout)
    assert "probe" in shown["tags"]
    listed = node.cli("probe", DOMAIN, "--list")
    assert data["id"] in listed.stdout
    human = node.cli("probe", DOMAIN, "--to", f"bob@{DOMAIN}").stdout
    assert "stored as" in human and "delivered in" in human and "next hop said: 250" in human


def test_probe_in_hold_mode_is_held_then_discarded(spooler: Any) -> None:
    result = spooler.cli("probe", DOMAIN)
    assert "held:" in result.stdout and f"<postmaster@{DOMAIN}>" in result.stdout
    entries = json.loads(spooler.cli("probe", DOMAIN, "--list", "--json").stdout)
    assert [entry["state"] for entry in entries] == ["held"]
    assert "discarded 1 probe recipient" in spooler.cli("probe", DOMAIN, "--discard").stdout
    entries = json.loads(spooler.cli("probe", DOMAIN, "--list", "--json").stdout)
    assert [entry["state"] for entry in entries] == ["discarded"]


def test_a_forged_probe_header_tags_nothing(spooler: Any) -> None:
    from tests.smtp_client import RawClient

    client = RawClient(spooler.port)
    client.reply()
    client.command("EHLO outsider.test")
    client.command("MAIL FROM:<x@outsider.test>")
    client.command(f"RCPT TO:<user@{DOMAIN}>")
    client.command("DATA")
    code, _ = client.command(b"X-Mxspool-Probe: 0123456789abcdef\r\nSubject: hi\r\n\r\nhi\r\n.")
    client.close()
    assert code == 250
    assert json.loads(spooler.cli("queue", "list", "--tag", "probe", "--json").stdout) == []


def test_probe_errors_say_what_to_do(spooler_factory: Any) -> None:
    node = spooler_factory()
    node.cli("domain", "add", DOMAIN, "--route", "127.0.0.1:2526", "--tls", "off")
    # No server running: the submission fails with a hint.
    result = node.cli("probe", DOMAIN, check=False)
    assert result.returncode == 1 and "mxspool serve" in result.stderr
    wrong = node.cli("probe", DOMAIN, "--to", "someone@other.test", check=False)
    assert wrong.returncode == 2 and f"user@{DOMAIN}" in wrong.stderr
