"""The mail log end to end: real SMTP into `mxspool serve`, real deliveries to a local target
(one delivered, one deferred by 451, one parked by 550), `mxspool log ID`, text and JSON, and
a hostile client that tries to forge log lines."""

from __future__ import annotations

import json
import re
import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Spooler
from tests.delivery.target import Target
from tests.waiting import wait_until

TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z mxspool/(smtpd|deliver|admin)\[\d+\]: "
    r"(?P<id>[0-9A-Z]+): (?P<event>[a-z]+(?:\.[a-z]+)?): (?P<fields>.*)$"
)


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target().start()
    server.behaviour.rcpt_replies["later@ok.test"] = "451 4.3.0 try again later"
    server.behaviour.rcpt_replies["gone@ok.test"] = "550 5.1.1 no such user"
    yield server
    server.stop()


def _parse(line: str, fmt: str) -> dict[str, Any]:
    """One log line as {queue_id, event, fields...}; fails the test if it is malformed."""
    if fmt == "json":
        data: dict[str, Any] = json.loads(line)
        return data
    match = TEXT_LINE.match(line)
    assert match is not None, f"not a mail-log line: {line!r}"
    return {"queue_id": match["id"], "event": match["event"], "text": match["fields"]}


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1] if path.exists() else []


def _send(port: int, helo: str, rcpts: list[str]) -> list[str]:
    ids = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo(helo)
        for rcpt in rcpts:
            client.mail("refused@src.test")  # a transaction RSET after its RCPT got 550
            assert client.rcpt("nobody@elsewhere.test")[0] == 550
            client.rset()
            client.mail("sender@src.test")
            client.rcpt(rcpt)
            code, reply = client.data(b"Subject: log test\r\n\r\nhello\r\n")
            assert code == 250
            ids.append(reply.decode().rsplit(" ", 1)[-1])
    return ids


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_one_line_per_transaction_and_attempt(
    spooler_factory: Any, target: Target, fmt: str
) -> None:
    node: Spooler = spooler_factory(delivery={"retry_schedule": ["1h"]})
    log = node.root / "mail.log"
    node.config.write_text(node.config.read_text() + f'[log]\nfile = "{log}"\nformat = "{fmt}"\n')
    node.cli("domain", "add", "ok.test", "--route", f"127.0.0.1:{target.port}", "--tls", "off")
    node.start()
    rcpts = ["someone@ok.test", "later@ok.test", "gone@ok.test"]
    ids = _send(node.port, "client.example", rcpts)
    expected = {ids[0]: "delivered", ids[1]: "deferred", ids[2]: "parked"}

    def attempts_logged() -> bool:
        found = [_parse(line, fmt) for line in _lines(log)]
        return {item["queue_id"] for item in found if item["event"] == "attempt"} >= set(ids)

    wait_until(attempts_logged, 30, "a delivery line for each message")
    for queue_id, status in expected.items():
        shown = node.cli("log", queue_id).stdout.splitlines()
        parsed = [_parse(line, fmt) for line in shown]
        assert [item["event"] for item in parsed] == ["queued", "attempt"], shown
        assert {item["queue_id"] for item in parsed} == {queue_id}
        queued, attempt = parsed
        rcpt = rcpts[list(expected).index(queue_id)]
        if fmt == "json":
            assert queued["from"] == "<sender@src.test>"
            assert queued["rcpt"] == [f"<{rcpt}> 250 2.1.5 Ok"]
            assert queued["helo"] == "client.example"
            assert queued["client"] == "unknown[127.0.0.1]"
            assert queued["reply"] == f"250 2.0.0 Ok: queued as {queue_id}"
            assert queued["size"] > 0
            assert attempt["to"] == [f"<{rcpt}>"]
            assert attempt["relay"] == f"[127.0.0.1]:{target.port}"
            assert attempt["status"] == status
            assert attempt["attempt"] == 1
            assert ("next_attempt" in attempt) == (status == "deferred")
            assert attempt["reply"].split()[0] == {"delivered": "250", "deferred": "451"}.get(
                status, "550"
            )
        else:
            assert f'from=<sender@src.test>, rcpt="<{rcpt}> 250 2.1.5 Ok"' in queued["text"]
            assert f'reply="250 2.0.0 Ok: queued as {queue_id}"' in queued["text"]
            assert f"to=<{rcpt}>, relay=[127.0.0.1]:{target.port}" in attempt["text"]
            assert f"status={status}" in attempt["text"]
    # The refused transactions (550 for elsewhere.test, then RSET) are logged too, unqueued.
    refused = [
        item for item in (_parse(line, fmt) for line in _lines(log)) if item["event"] == "abandoned"
    ]
    assert len(refused) == 3
    assert all(item["queue_id"] == "NOQUEUE" for item in refused)
    if fmt == "json":
        assert refused[0]["rcpt"] == ["<nobody@elsewhere.test> 550 5.7.1 Relaying denied"]
        assert refused[0]["why"] == "rset"
    # The target saw exactly the one delivered message; the log said so once.
    assert [rcpt for rcpt, _ in target.recorder.deliveries()] == ["someone@ok.test"]


def test_hostile_helo_and_address_cannot_forge_a_line(spooler_factory: Any) -> None:
    node: Spooler = spooler_factory()
    log = node.root / "mail.log"
    node.config.write_text(node.config.read_text() + f'[log]\nfile = "{log}"\n')
    node.cli("domain", "add", "ok.test", "--route", "127.0.0.1:9", "--tls", "off", "--hold")
    node.start()
    forged = 'x, from=<boss@bank.example>" \\ \xa0'
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()

        def command(line: bytes) -> bytes:
            sock.sendall(line + b"\r\n")
            reply = reader.readline()
            while reply[3:4] == b"-":
                reply = reader.readline()
            return reply

        # A bare CR and control characters: the line is split or refused, never logged raw.
        assert command(b"EHLO evil\rFAKE: queued: from=<forged@x>")[:3] == b"250"
        reader.readline()  # the reply to the second half ("FAKE: ...": unknown command)
        assert command(b"EHLO evil\x0b\x1b[2Jname")[:3] == b"501"
        assert command(b"EHLO " + forged.encode())[:3] == b"250"
        address = b'"a\\" 250 2.0.0 Ok: queued as FAKE, b"@src.test'
        assert command(b"MAIL FROM:<" + address + b">")[:3] == b"250"
        assert command(b"RCPT TO:<user@ok.test>")[:3] == b"250"
        assert command(b"DATA")[:3] == b"354"
        reply = command(b"Subject: x\r\n\r\nbody\r\n.")
        assert reply[:3] == b"250", reply
        queue_id = reply.split()[-1].decode()
        assert command(b"QUIT")[:3] == b"221"

    def session_logged() -> list[str]:
        return [line for line in _lines(log) if "disconnect:" in line and "messages=1" in line]

    wait_until(session_logged, 15, "the hostile session's disconnect line")
    lines = _lines(log)
    for line in lines:
        assert TEXT_LINE.match(line), f"a line broke or was forged: {line!r}"
    assert not any("FAKE" in line.split(": ")[1] for line in lines)
    shown = node.cli("log", queue_id).stdout.splitlines()
    assert len(shown) == 1
    # The HELO stayed one quoted value, its quote, backslash and NBSP escaped.
    assert 'helo="x, from=<boss@bank.example>\\" \\\\ \\xa0"' in shown[0]
    assert 'from="<\\"a\\\\\\" 250 2.0.0 Ok: queued as FAKE, b\\"@src.test>"' in shown[0]
    assert node.cli("log", "FAKE", check=False).returncode == 1


def test_log_command_says_where_stderr_logging_goes(spooler_factory: Any) -> None:
    node: Spooler = spooler_factory()  # [log] file = "": stderr, as for journald
    result = node.cli("log", "0238TF57C0D2GPJLTD", check=False)
    assert result.returncode == 2
    assert "journalctl -u mxspool | grep 0238TF57C0D2GPJLTD" in result.stderr
