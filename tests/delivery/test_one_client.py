"""One outbound SMTP client and one ``Reply`` type (issue 15 item 2).

Delivery, ``queue bounce``, the route checks and the flow probe all talk SMTP through
``delivery.smtpclient``; aiosmtplib is only the tests' reference. A reply the client receives is
the SMTP core's ``Reply``: the same value the server sends, with the classification delivery
needs (Exchange Online's throttling codes) and the one-line form the ledger keeps.
"""

from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mxspool.config import Config
from mxspool.delivery import exchange
from mxspool.delivery.bounce import bounce_message
from mxspool.delivery.errors import ConnectionLost
from mxspool.delivery.routing import Hop
from mxspool.delivery.smtpclient import SmtpConnector, _Wire
from mxspool.delivery.transport import Transaction
from mxspool.envelope import MailParams, RcptParams, Recipient
from mxspool.migrate.smtpprobe import SmtpProber
from mxspool.smtp.replies import Reply
from mxspool.store.base import TlsMode
from mxspool.store.sqlite import SqliteStore
from tests.delivery.conftest import DOMAIN, add_domain, put_message
from tests.delivery.target import Target
from tests.delivery.test_smtpclient import Handler, _scripted

SRC = Path(__file__).resolve().parents[2] / "src" / "mxspool"


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every write our client makes, in order (nothing when another client does the talking)."""
    seen: list[bytes] = []
    original = _Wire.write

    def spy(self: _Wire, data: bytes) -> None:
        seen.append(data)
        original(self, data)

    monkeypatch.setattr(_Wire, "write", spy)
    return seen


@pytest.fixture
def sender_side() -> Iterator[Target]:
    server = Target().start()
    yield server
    server.stop()


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_no_module_of_mxspool_imports_aiosmtplib() -> None:
    modules = sorted(SRC.rglob("*.py"))
    assert len(modules) > 50  # positive control: the scan reads the package
    assert any("asyncio" in _imports(path) for path in modules)
    assert [str(p.relative_to(SRC)) for p in modules if "aiosmtplib" in _imports(p)] == []
    assert not (SRC / "delivery" / "reply.py").exists()  # one Reply: smtp.replies


def test_every_smtp_sending_command_works_without_aiosmtplib() -> None:
    """aiosmtplib is a test dependency now: the package must import and build its clients
    without it (a lazy import would fail here, at the call)."""
    script = """
import asyncio, sys
sys.modules["aiosmtplib"] = None  # import aiosmtplib -> ImportError
import mxspool.cli, mxspool.delivery.bounce, mxspool.delivery.scheduler
import mxspool.migrate.actions, mxspool.migrate.probe, mxspool.migrate.routecheck
from mxspool.config import Config
from mxspool.migrate import actions
from mxspool.delivery.smtpclient import SmtpConnector
prober = actions._prober(Config.model_validate({"smtp": {"hostname": "t"}}))
assert isinstance(prober._client, SmtpConnector)
try:
    import aiosmtplib
except ImportError:
    print("blocked")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "blocked"  # positive control: the block was in force


async def test_queue_bounce_goes_through_our_client(
    store: SqliteStore, sender_side: Target, writes: list[bytes]
) -> None:
    await add_domain(store, 1, hold=True)
    queue_id, _ = await put_message(store, [f"a@{DOMAIN}"])
    # The sender's domain is one of ours, routed to a test server: no DNS needed.
    await add_domain(store, sender_side.port, name="src.test", tls=TlsMode.OPPORTUNISTIC)
    config = Config.model_validate({"smtp": {"hostname": "mx.test.local"}})
    result = await bounce_message(config, store, queue_id)  # the default connector
    assert isinstance(result.reply, Reply) and result.reply.positive
    assert len(sender_side.recorder.received) == 1
    sent = b"".join(writes)
    assert sent.startswith(b"EHLO mx.test.local\r\n")
    assert b"MAIL FROM:<>" in sent and b"RCPT TO:<sender@src.test>" in sent


async def test_route_check_goes_through_our_client(target: Target, writes: list[bytes]) -> None:
    target.behaviour.rcpt_replies = {f"gone@{DOMAIN}": "550 5.1.1 no such user"}
    prober = SmtpProber(local_hostname="mx.test.local", timeout=5.0)
    hop = Hop("127.0.0.1", "127.0.0.1", target.port)
    addresses = [f"ok@{DOMAIN}", f"gone@{DOMAIN}", f"evil@{DOMAIN}>\r\nDATA"]
    report = await prober.examine(hop, TlsMode.OFF, addresses)
    assert report.connected and report.banner.startswith("220 ")
    results = {r.address: (r.code, r.reply) for r in report.rcpts}
    assert results[f"ok@{DOMAIN}"] == (250, "2.1.5 Ok")  # positive control
    assert results[f"gone@{DOMAIN}"] == (550, "5.1.1 no such user")
    # A control character never reaches the wire: no reply, and the session is given up.
    code, reply = results[addresses[2]]
    assert code == 0 and "control characters" in reply
    sent = b"".join(writes)
    assert b"RCPT TO:<ok@" in sent and b"RCPT TO:<gone@" in sent
    assert b"evil" not in sent and b"DATA" not in sent
    assert target.recorder.received == []


def _answering(rcpt_reply: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hi\r\n")
        while line := await reader.readline():
            verb = line.split(b" ")[0].strip().upper()
            if verb == b"EHLO":
                writer.write(b"250-hi\r\n250 PIPELINING\r\n")
            elif verb == b"MAIL":
                writer.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                writer.write(rcpt_reply)
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                while (await reader.readline()) not in (b".\r\n", b""):
                    pass
                writer.write(b"250 2.0.0 Ok: queued as X1\r\n")
            elif verb in (b"RSET", b"QUIT"):
                writer.write(b"250 Ok\r\n" if verb == b"RSET" else b"221 Bye\r\n")

    return handler


def _tx() -> Transaction:
    async def body() -> AsyncIterator[bytes]:
        yield b"x\r\n"

    return Transaction(
        "s@src.test", MailParams(size=3), (Recipient(f"a@{DOMAIN}", RcptParams()),), 3, body
    )


async def _rcpt_reply(wire: bytes) -> Reply:
    server, port = await _scripted(_answering(wire))
    try:
        session = await SmtpConnector(local_hostname="t", connect_timeout=2.0).open(
            Hop("127.0.0.1", "127.0.0.1", port), TlsMode.OFF
        )
        (reply,) = await session.send(_tx())
        await session.close()
        return reply
    finally:
        server.close()


async def test_a_received_reply_is_the_servers_reply_type() -> None:
    wire = b"451-4.7.500 Server busy.\r\n451 4.7.500 Please try again later. AS(1)\r\n"
    reply = await _rcpt_reply(wire)
    assert type(reply) is Reply
    assert (reply.code, reply.enhanced) == (451, "4.7.500")
    assert reply.lines == ("Server busy.", "Please try again later. AS(1)")
    assert reply.to_bytes() == wire  # what the hop sent, as the server would send it
    assert str(reply) == "451 4.7.500 Server busy. 4.7.500 Please try again later. AS(1)"
    assert exchange.is_throttling(reply) and not reply.positive and not reply.permanent
    # Positive control: a 4.7.x outside 500-699 is not Exchange Online's throttling.
    assert not exchange.is_throttling(await _rcpt_reply(b"451 4.7.1 Greylisted\r\n"))


async def test_lines_without_the_same_code_are_kept_as_received() -> None:
    wire = b"550-5.4.1 Recipient address rejected: Access denied.\r\n550 AS(201806281)\r\n"
    reply = await _rcpt_reply(wire)
    assert reply.enhanced is None and reply.enhanced_status == "5.4.1"
    assert reply.to_bytes() == wire
    assert str(reply) == "550 5.4.1 Recipient address rejected: Access denied. AS(201806281)"
    assert reply.permanent


async def test_a_reply_code_outside_smtp_breaks_the_session() -> None:
    with pytest.raises(ConnectionLost, match="not an SMTP reply code"):
        await _rcpt_reply(b"999 what\r\n")
    delivered = await _rcpt_reply(b"250 2.1.5 Ok\r\n")  # positive control
    assert str(delivered) == "250 2.0.0 Ok: queued as X1"


def test_parse_round_trips_what_the_server_writes() -> None:
    for sent in (
        Reply(250, "2.0.0", "Ok: queued as ABC"),
        Reply(250, None, ("mx.example", "PIPELINING", "SIZE 1000")),
        Reply(550, "5.1.1", ("The email account", "does not exist")),
        Reply(354, None, "End data with <CR><LF>.<CR><LF>"),
    ):
        lines = [line[4:].decode() for line in sent.to_bytes().split(b"\r\n")[:-1]]
        assert Reply.parse(sent.code, lines) == sent
    assert Reply.parse(550, ["5.1.1 a\rb"]).lines == ("a b",)  # no line break survives
    with pytest.raises(ValueError):
        Reply.parse(199, ["x"])
