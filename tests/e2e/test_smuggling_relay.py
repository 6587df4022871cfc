"""SMTP smuggling end to end: hostile endings -> `mxspool serve` (held) -> release -> targets.

Every ending of the smuggling family (<LF>.<LF> and friends) is sent with a would-be second
transaction after it, plus messages written with LF line ends only. With the default
bare_newlines = "normalize" each is one message, stored as CRLF text; on release every message
arrives exactly once at two real next hops: the strict aiosmtpd target (tests/delivery/target.py)
and a lenient one that ends lines at a bare LF and data at any "." line, as receivers open to
smuggling do, which records the raw bytes on the wire. No smuggled second message may arrive
at either, and the smuggled text arrives as body text of the first. With "reject" the
500 5.5.2 reply stays.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests import waiting
from tests.conftest import Spooler
from tests.delivery.target import Target
from tests.smtp_client import RawClient, split_received

# Ending -> what "normalize" stores for b"before" + ending + b"after".
FORMS: dict[bytes, bytes] = {
    b"\n.\n": b"before\r\nafter",
    b"\r.\r": b"before\r\nafter",
    b"\n.\r\n": b"before\r\nafter",
    b"\r.\r\n": b"before\r\nafter",
    b"\r\n.\n": b"before\r\nafter",
    b"\r\n.\r": b"before\r\nafter",
    b"\n.\r": b"before\r\nafter",
    b"\r.\n": b"before\r\nafter",
    b"\r\r\n.\r\r\n": b"before\r\n\r\n\r\nafter",
    b"\r\n\x00.\r\n": b"before\r\n\x00.\r\nafter",
    b"\r\n.\x00\r\n": b"before\r\n\x00\r\nafter",
    b"\r\n..\n": b"before\r\n.\r\nafter",
}
SECOND = (
    b"MAIL FROM:<evil@smuggler.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nevil\r\n"
)
LF_ONLY = (
    b"Subject: lf only\n\nline one\n..dotted\n.\nMAIL FROM:<evil@smuggler.test>\n"
    b"RCPT TO:<victim@example.test>\nDATA\nevil\n"
)
LF_ONLY_STORED = (
    b"Subject: lf only\r\n\r\nline one\r\n.dotted\r\nMAIL FROM:<evil@smuggler.test>\r\n"
    b"RCPT TO:<victim@example.test>\r\nDATA\r\nevil\r\n\r\n"
)
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def messages() -> list[tuple[bytes, bytes]]:
    """(what the client sends after the 354, up to the "." of the genuine end; what must be
    stored)."""
    out = []
    for i, (form, stored) in enumerate(FORMS.items()):
        head = f"Message-ID: <form{i}@src.test>\r\nSubject: form {i}\r\n\r\n".encode()
        sent = head + b"before" + form + SECOND
        out.append((sent, head + stored.replace(b"after", SECOND)))
    for i in range(3):
        head = f"Message-ID: <lf{i}@src.test>\n".encode()
        # LF line ends throughout, then the genuine end, as a client that writes the body with
        # LF and ends DATA by the book sends it: one empty line more.
        out.append((head + LF_ONLY + b"\r\n", head.replace(b"\n", b"\r\n") + LF_ONLY_STORED))
    return out


def _message_id(data: bytes) -> bytes:
    found = re.search(rb"Message-ID: <(\w+)@src\.test>", data)
    assert found is not None, data[:200]
    return found.group(1)


class LenientTarget:
    """A next hop that reads lines up to LF alone and takes any "." line as the end of data:
    what a receiver open to SMTP smuggling does. Records the raw DATA bytes as they came."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.transactions: list[tuple[bytes, list[bytes], bytes]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            conn.sendall(b"220 lenient.test ESMTP\r\n")
            mail, rcpts = b"", []
            while line := reader.readline(4096):
                command = line.rstrip(b"\r\n")
                verb = command[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    conn.sendall(b"250-lenient.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif verb == b"MAIL":
                    mail, rcpts = command, []
                    conn.sendall(b"250 2.1.0 Ok\r\n")
                elif verb == b"RCPT":
                    rcpts.append(command)
                    conn.sendall(b"250 2.1.5 Ok\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    raw = bytearray()
                    while (part := reader.readline(65536)) and part.rstrip(b"\r\n") != b".":
                        raw += part
                    with self.lock:
                        self.transactions.append((mail, rcpts, bytes(raw)))
                    conn.sendall(b"250 2.0.0 Ok\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    conn.sendall(b"250 2.0.0 Ok\r\n")


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target().start()
    yield server
    server.stop()


@pytest.fixture
def lenient() -> Iterator[LenientTarget]:
    server = LenientTarget()
    yield server
    server.stop()


def send_all(node: Spooler, bodies: list[bytes]) -> list[tuple[int, str]]:
    """Each body in its own transaction on one connection: the reply to its content, and a
    check that nothing after a fake end ran as a command (the next reply is HELP's 214)."""
    client = RawClient(node.port)
    assert client.reply()[0] == 220
    assert client.command("EHLO smuggler.client")[0] == 250
    results = []
    for body in bodies:
        client.send(
            b"MAIL FROM:<legit@src.test>\r\nRCPT TO:<u@example.test>\r\n"
            b"RCPT TO:<u@lenient.test>\r\nDATA\r\n"
        )
        assert [code for code, _ in client.replies(4)] == [250, 250, 250, 354]
        client.send(body + b".\r\nHELP\r\n")
        results.append(client.reply())
        assert client.reply()[0] == 214, "a command ran between the fake end and the real one"
    assert client.command("QUIT")[0] == 221
    client.close()
    return results


def _node(spooler_factory: Any, target: Target, lenient: LenientTarget, **smtp: Any) -> Spooler:
    node: Spooler = spooler_factory(
        smtp=smtp, delivery={"retry_schedule": ["1s"], "connect_timeout": "5s"}
    )
    for domain, port in (("example.test", target.port), ("lenient.test", lenient.port)):
        route = f"127.0.0.1:{port}"
        node.cli("domain", "add", domain, "--route", route, "--tls", "off", "--hold")
    node.start()
    return node


def test_smuggling_endings_relay_as_one_message_each(
    spooler_factory: Any, target: Target, lenient: LenientTarget
) -> None:
    node = _node(spooler_factory, target, lenient)  # the default: bare_newlines = "normalize"
    cases = messages()
    replies = send_all(node, [sent for sent, _ in cases])
    assert [code for code, _ in replies] == [250] * len(cases), replies
    queue_ids = [text.rsplit(" ", 1)[-1] for _, text in replies]
    assert target.recorder.received == [] and lenient.transactions == []  # held
    for domain in ("example.test", "lenient.test"):
        node.cli("domain", "release", domain)
    count = len(cases)
    waiting.wait_until(
        lambda: len(target.recorder.received) >= count and len(lenient.transactions) >= count,
        60,
        "every message at both targets",
    )
    waiting.wait_until(
        lambda: (
            {row["domain"]: row["delivered"] for row in node.status()["domains"]}
            == {"example.test": count, "lenient.test": count}
        ),
        30,
        "every delivery recorded",
    )

    # The strict target: exactly one transaction per message, the stored bytes, well-formed.
    received = target.recorder.received
    assert len(received) == count and target.recorder.mail_commands == count
    assert {item.mail_from for item in received} == {"legit@src.test"}
    assert all(item.rcpt_tos == ["u@example.test"] for item in received)
    assert not any(rcpt == "victim@example.test" for _, rcpt, _ in target.recorder.rcpts)
    by_id = {_message_id(item.data): item for item in received}
    assert len(by_id) == count
    for queue_id, (_, stored) in zip(queue_ids, cases, strict=True):
        header, rest = split_received(by_id[_message_id(stored)].data)
        assert rest == stored and SECOND.split(b"\r\n")[0] in rest  # the smuggled text is body
        assert queue_id.encode() in header
        assert not _BARE.search(header + rest)
    # The ledger's sha256 is of the stored (normalised) bytes, which are what was delivered.
    rows = json.loads(node.cli("report", "--domain", "example.test", "--format", "json").stdout)
    digests = {hashlib.sha256(item.data).hexdigest() for item in received}
    assert {row["sha256"] for row in rows} == digests

    # The lenient target: one transaction per message too, and on the wire only CRLF lines,
    # every "." that starts a line stuffed, so no early end even for a bare-LF reader.
    transactions = lenient.transactions
    assert len(transactions) == count
    assert {mail for mail, _, _ in transactions} == {b"MAIL FROM:<legit@src.test>"}
    assert all(rcpts == [b"RCPT TO:<u@lenient.test>"] for _, rcpts, _ in transactions)
    for _, _, raw in transactions:
        assert not _BARE.search(raw) and raw.endswith(b"\r\n")
        lines = raw[:-2].split(b"\r\n")
        content = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
        assert content + b"\r\n" in {item.data for item in received}


def test_reject_mode_keeps_the_500(
    spooler_factory: Any, target: Target, lenient: LenientTarget
) -> None:
    node = _node(spooler_factory, target, lenient, bare_newlines="reject")
    cases = messages()
    replies = send_all(node, [sent for sent, _ in cases])
    for (sent, _), (code, text) in zip(cases, replies, strict=True):
        if _BARE.search(sent):
            assert (code, text) == (500, "5.5.2 Bare CR or LF not allowed")
        else:  # the NUL forms have no bare line end: one message, accepted (positive control)
            assert code == 250, text
    accepted = sum(code == 250 for code, _ in replies)
    assert accepted == 2
    assert node.domain_status("example.test")["held"] == accepted
    entries = json.loads(node.cli("queue", "list", "--json").stdout)
    assert len(entries) == 2 * accepted  # one per recipient: nothing smuggled was stored
    assert not any("victim" in entry["rcpt"] for entry in entries)


def test_the_lenient_target_is_open_to_smuggling(lenient: LenientTarget) -> None:
    """The control for the test above: sent <LF>.<LF> directly, this target does take a second
    transaction, so one per message there means our stream had no fake end."""
    client = RawClient(lenient.port)
    assert client.reply()[0] == 220
    client.send(b"EHLO c\r\nMAIL FROM:<legit@src.test>\r\nRCPT TO:<u@lenient.test>\r\nDATA\r\n")
    assert [code for code, _ in client.replies(4)] == [250, 250, 250, 354]
    client.send(b"hello\n.\n" + SECOND + b".\r\n")
    assert [code for code, _ in client.replies(5)] == [250, 250, 250, 354, 250]
    assert client.command("QUIT")[0] == 221
    client.close()
    assert [mail for mail, _, _ in lenient.transactions] == [
        b"MAIL FROM:<legit@src.test>",
        b"MAIL FROM:<evil@smuggler.test>",
    ]
