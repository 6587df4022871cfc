"""MAIL FROM with an address literal is refused (550 5.7.1) unless [smtp] allow_sender_literals:
a bounce to it would connect wherever the client wrote (issue 14 item 4)."""

from __future__ import annotations

from typing import Any

from tests.conftest import Spooler
from tests.smtp_client import RawClient


def _mail_from(node: Spooler, sender: str) -> tuple[int, str]:
    client = RawClient(node.port)
    try:
        client.reply()  # greeting
        assert client.command("EHLO client.test")[0] == 250
        return client.command(f"MAIL FROM:<{sender}>")
    finally:
        client.close()


def _send(node: Spooler, sender: str) -> tuple[int, str]:
    """A whole transaction; the reply to the final dot."""
    client = RawClient(node.port)
    try:
        client.reply()
        assert client.command("EHLO client.test")[0] == 250
        assert client.command(f"MAIL FROM:<{sender}>")[0] == 250
        assert client.command("RCPT TO:<user@example.test>")[0] == 250
        assert client.command("DATA")[0] == 354
        return client.command(b"Subject: x\r\n\r\nbody\r\n.")
    finally:
        client.close()


def test_literal_sender_refused_by_default(spooler: Spooler) -> None:
    for literal in ("victim@[127.0.0.1]", "victim@[IPv6:::1]", "x@[10.0.0.5]"):
        code, text = _mail_from(spooler, literal)
        assert code == 550, (literal, code, text)
        assert "5.7.1" in text and "Address literals are not accepted" in text
    # Positive controls: a domain sender and the null sender are accepted on the same server.
    assert _mail_from(spooler, "sender@src.test")[0] == 250
    assert _mail_from(spooler, "")[0] == 250
    assert _send(spooler, "sender@src.test")[0] == 250


def test_allow_sender_literals_accepts_them(spooler_factory: Any) -> None:
    node: Spooler = spooler_factory(smtp={"allow_sender_literals": True})
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--tls", "off", "--hold")
    node.start()
    code, text = _send(node, "victim@[127.0.0.1]")
    assert code == 250, text
    queue_id = text.rsplit(" ", 1)[-1]
    assert "victim@[127.0.0.1]" in node.cli("queue", "show", queue_id).stdout
