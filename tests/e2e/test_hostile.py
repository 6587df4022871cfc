"""Hostile input over real sockets: each gets its defined reply; only legitimate mail is stored."""

from __future__ import annotations

import sqlite3
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import Spooler
from tests.smtp_client import RawClient
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("mx.test.local", "127.0.0.1")
    root = tmp_path_factory.mktemp("certs")
    cert_path, key_path = root / "cert.pem", root / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_path)
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(cert_path, append=True)
    cert.private_key_pem.write_to_path(key_path)
    return ca, cert_path, key_path


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, certs: tuple[trustme.CA, Path, Path]
) -> Iterator[Spooler]:
    _, cert_path, key_path = certs
    spooler = Spooler(
        tmp_path_factory.mktemp("hostile"),
        smtp={
            "max_recipients": 3,
            "max_message_size": "100KiB",
            "idle_timeout": "2s",
            "tls_cert": str(cert_path),
            "tls_key": str(key_path),
            "bare_newlines": "reject",  # not the default: these tests pin the 500 5.5.2 path
        },
    )
    spooler.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--hold")
    spooler.start()
    yield spooler
    spooler.stop()


def session(node: Spooler) -> RawClient:
    client = RawClient(node.port)
    assert client.reply()[0] == 220
    assert client.command("EHLO hostile.client")[0] == 250
    return client


def _greeted(port: int) -> RawClient | None:
    """A new connection if the server greets it with 220; None (closed) if it refuses it."""
    client = RawClient(port)
    if client.reply()[0] == 220:
        return client
    client.close()
    return None


def senders(node: Spooler) -> list[str]:
    conn = sqlite3.connect(node.db)
    try:
        return [row[0] for row in conn.execute("SELECT mail_from FROM messages")]
    finally:
        conn.close()


@pytest.mark.parametrize(
    "address",
    [
        "user%other.test@example.test",
        "@relay.test:user@example.test",
        "@a.test,@b.test:user@example.test",
        "other.test!user@example.test",
        '"user@other.test"@example.test',
        '"user%other.test"@example.test',
        "user@[127.0.0.1]",
        "user@[IPv6:::1]",
        "user@other.test",
        "user@sub.example.test",
        "user@example.test.",
        "user@example.test.other.test",
    ],
)
def test_relay_attempts_are_denied(node: Spooler, address: str) -> None:
    client = session(node)
    assert client.command("MAIL FROM:<a@src.test>")[0] == 250
    code, text = client.command(f"RCPT TO:<{address}>")
    assert code in (550, 501, 553), (address, code, text)
    if code == 550:
        assert text == "5.7.1 Relaying denied"
    # Nothing was accepted, so DATA is refused.
    assert client.command("DATA")[0] in (503, 554)
    client.close()


def test_configured_domain_any_case_and_null_sender_accepted(node: Spooler) -> None:
    client = session(node)
    assert client.command("MAIL FROM:<>")[0] == 250
    assert client.command("RCPT TO:<User@EXAMPLE.Test>")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(b"Subject: null sender\r\n\r\nbounce\r\n.\r\n")
    assert client.reply()[0] == 250
    client.close()


SMUGGLE_FORMS = {
    "LF.LF": b"\n.\n",
    "CR.CR": b"\r.\r",
    "LF.CRLF": b"\n.\r\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "NUL before dot": b"\r\n\x00.\r\n",
    "NUL after dot": b"\r\n.\x00\r\n",
    "CRCRLF.CRCRLF": b"\r\r\n.\r\r\n",
}


@pytest.mark.parametrize("form", list(SMUGGLE_FORMS))
def test_end_of_data_smuggling(node: Spooler, form: str) -> None:
    client = session(node)
    client.send(b"MAIL FROM:<legit@src.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n")
    assert [code for code, _ in client.replies(3)] == [250, 250, 354]
    smuggled = (
        b"MAIL FROM:<evil@smuggler.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nevil\r\n"
    )
    client.send(b"Subject: legit\r\n\r\nhello" + SMUGGLE_FORMS[form] + smuggled + b".\r\n")
    code, text = client.reply()
    # Exactly one reply for the whole DATA: nothing after the fake marker ran as a command.
    assert client.command("NOOP")[0] == 250
    if b"\x00" in SMUGGLE_FORMS[form]:
        assert code in (250, 554, 500), text  # one message, whatever its fate
    else:
        assert (code, text) == (500, "5.5.2 Bare CR or LF not allowed")
    client.close()
    assert "evil@smuggler.test" not in senders(node)


def test_bare_lf_in_headers_rejected(node: Spooler) -> None:
    client = session(node)
    client.send(b"MAIL FROM:<bare@src.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n")
    client.replies(3)
    client.send(b"Subject: a\nX-Other: b\r\n\r\nbody\r\n.\r\n")
    assert client.reply() == (500, "5.5.2 Bare CR or LF not allowed")
    client.close()
    assert "bare@src.test" not in senders(node)


def test_bare_lf_in_a_command_rejected(node: Spooler) -> None:
    client = session(node)
    client.send(b"MAIL FROM:<x@src.test>\nRCPT TO:<u@example.test>\r\n")
    code, _ = client.reply()
    assert code == 500
    client.close()


def test_over_long_lines(node: Spooler) -> None:
    client = session(node)
    code, _ = client.command("NOOP " + "x" * 600)
    assert code == 500
    assert client.command("NOOP")[0] == 250
    client.send(b"MAIL FROM:<long@src.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n")
    client.replies(3)
    client.send(b"Subject: long\r\n\r\n" + b"a" * 1200 + b"\r\n.\r\n")
    code, _ = client.reply()
    assert code >= 500
    client.close()
    assert "long@src.test" not in senders(node)


def test_too_many_recipients_keeps_the_earlier_ones(node: Spooler) -> None:
    client = session(node)
    client.command("MAIL FROM:<many@src.test>")
    codes = [client.command(f"RCPT TO:<u{i}@example.test>") for i in range(5)]
    assert [code for code, _ in codes] == [250, 250, 250, 452, 452]
    assert codes[3][1] == "4.5.3 Too many recipients"
    assert client.command("DATA")[0] == 354
    client.send(b"Subject: many\r\n\r\nx\r\n.\r\n")
    code, text = client.reply()
    assert code == 250
    queue_id = text.rsplit(" ", 1)[-1]
    client.close()
    shown = node.cli("queue", "show", queue_id, "--json").stdout
    assert all(f"u{i}@example.test" in shown for i in range(3))
    assert "u3@example.test" not in shown


def test_size_limits(node: Spooler) -> None:
    client = session(node)
    code, text = client.command("MAIL FROM:<big@src.test> SIZE=999999999")
    assert (code, text) == (552, "5.3.4 Message too big")
    for bad in ("SIZE=-1", "SIZE=abc", "SIZE=", "SIZE=1 SIZE=2", "FROB=1"):
        assert client.command(f"MAIL FROM:<big@src.test> {bad}")[0] in (501, 555), bad
    # No state changed: RCPT still needs a MAIL first.
    assert client.command("RCPT TO:<u@example.test>")[0] == 503
    client.command("MAIL FROM:<big@src.test> SIZE=1000")
    client.command("RCPT TO:<u@example.test>")
    assert client.command("DATA")[0] == 354
    client.send(b"Subject: big\r\n\r\n" + (b"b" * 998 + b"\r\n") * 150 + b".\r\n")
    assert client.reply() == (552, "5.3.4 Message too big")
    assert client.command("NOOP")[0] == 250
    client.close()
    assert "big@src.test" not in senders(node)


def test_commands_out_of_order(node: Spooler) -> None:
    client = RawClient(node.port)
    client.reply()
    assert client.command("MAIL FROM:<a@src.test>")[0] == 503  # before EHLO
    client.command("EHLO order.client")
    assert client.command("RCPT TO:<u@example.test>")[0] == 503
    assert client.command("DATA")[0] == 503
    client.command("MAIL FROM:<a@src.test>")
    assert client.command("MAIL FROM:<a@src.test>")[0] == 503
    assert client.command("DATA")[0] in (503, 554)
    assert client.command("VRFY u@example.test")[0] == 252
    assert client.command("EXPN list")[0] == 502
    assert client.command("AUTH PLAIN AAAA")[0] in (502, 500)
    assert client.command("HELP")[0] == 214
    assert client.command("BOGUS")[0] == 500
    assert client.command("QUIT")[0] == 221
    client.close()


def test_ehlo_advertises_extensions(node: Spooler) -> None:
    client = RawClient(node.port)
    client.reply()
    code, text = client.command("EHLO ext.client")
    assert code == 250
    for keyword in (
        "PIPELINING",
        f"SIZE {100 * 1024}",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "DSN",
        "STARTTLS",
    ):
        assert keyword in text.splitlines(), (keyword, text)
    assert "AUTH" not in text
    client.close()


def test_mail_loop_detected(node: Spooler) -> None:
    for hops, expected in ((49, 250), (50, 554)):
        client = session(node)
        client.send(
            f"MAIL FROM:<loop{hops}@src.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n".encode()
        )
        client.replies(3)
        header = b"".join(
            b"Received: from hop%d by hop%d; date\r\n" % (i, i + 1) for i in range(hops)
        )
        client.send(header + b"Subject: loop\r\n\r\nx\r\n.\r\n")
        code, text = client.reply()
        assert code == expected, (hops, text)
        if expected == 554:
            assert text == "5.4.6 Mail loop detected"
        client.close()
    assert "loop50@src.test" not in senders(node)
    assert "loop49@src.test" in senders(node)


def test_starttls_discards_pipelined_plaintext(
    node: Spooler, certs: tuple[trustme.CA, Path, Path]
) -> None:
    ca, _, _ = certs
    client = session(node)
    client.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
    code, _ = client.reply()
    assert code == 220
    context = ssl.create_default_context()
    ca.configure_trust(context)
    # The injected line went in the same send (one loopback segment) as STARTTLS, which the
    # server has answered: it was in the server's buffer when the 220 was written.
    client.buffer = b""
    client.starttls(context, "mx.test.local")
    code, text = client.command("EHLO tls.client")
    assert code == 250 and "STARTTLS" not in text
    # The injected MAIL was discarded: RCPT still has no transaction to join.
    assert client.command("RCPT TO:<u@example.test>")[0] == 503
    assert client.command("MAIL FROM:<tls@src.test>")[0] == 250
    assert client.command("RCPT TO:<u@example.test>")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(b"Subject: tls\r\n\r\nsecret\r\n.\r\n")
    code, text = client.reply()
    assert code == 250
    queue_id = text.rsplit(" ", 1)[-1]
    client.close()
    exported = node.cli("queue", "export", queue_id, binary=True).stdout
    assert b"with ESMTPS (TLSv1." in exported.split(b"\r\n\r\n")[0]


def test_idle_timeout_per_command_and_per_data_chunk(node: Spooler) -> None:
    client = session(node)
    client.send(b"MAIL FROM:<slow@src.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n")
    client.replies(3)
    # DATA as a whole takes longer than the idle timeout (2 s), but no pause is that long, not
    # even when a loaded machine stalls this test for a second: through each pause the server
    # says nothing and keeps the session.
    client.send(b"Subject: slow\r\n\r\n")
    for _ in range(8):
        assert client.quiet_for(0.4)
        client.send(b"still here\r\n")
    client.send(b".\r\n")
    assert client.reply()[0] == 250
    # Now stay silent (the positive control for the quiet pauses): the server says 421 and
    # closes.
    code, _ = client.reply()
    assert code == 421
    assert client.closed_by_peer()


def test_connection_limits(spooler_factory: Any) -> None:
    node: Spooler = spooler_factory(smtp={"max_connections_per_ip": 3, "max_connections": 5})
    node.start()
    clients = []
    for _ in range(3):
        client = RawClient(node.port)
        assert client.reply()[0] == 220
        clients.append(client)
    extra = RawClient(node.port)
    assert extra.reply() == (421, "4.7.0 Too many connections")
    assert extra.closed_by_peer()
    clients.pop().close()
    again = wait_until(lambda: _greeted(node.port), 10, "a slot freed by the closed client")
    for client in [*clients, again]:
        client.close()
