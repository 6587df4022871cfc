"""Our SMTP client on its own: pipelining, the path without it, and the edges where a hop
misbehaves (refused greeting, silence, STARTTLS response injection, command injection)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from mxspool.delivery.errors import ConnectFailed, ConnectionLost, TlsFailed, Unsupported
from mxspool.delivery.routing import Hop
from mxspool.delivery.smtpclient import SmtpConnector, _Wire
from mxspool.delivery.transport import Transaction
from mxspool.envelope import MailParams, RcptParams, Recipient
from mxspool.store.base import TlsMode
from tests.delivery.conftest import DOMAIN, message_bytes
from tests.delivery.target import Target


def _tx(recipients: list[str], data: bytes, mail_from: str = "s@src.test") -> Transaction:
    async def body() -> AsyncIterator[bytes]:
        yield data

    return Transaction(
        mail_from=mail_from,
        mail_params=MailParams(size=len(data)),
        recipients=tuple(Recipient(r, RcptParams()) for r in recipients),
        size=len(data),
        body=body,
    )


def _hop(port: int) -> Hop:
    return Hop("127.0.0.1", "127.0.0.1", port)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every write the client makes, in order."""
    seen: list[bytes] = []
    original = _Wire.write

    def spy(self: _Wire, data: bytes) -> None:
        seen.append(data)
        original(self, data)

    monkeypatch.setattr(_Wire, "write", spy)
    return seen


def _connector(**kwargs: float) -> SmtpConnector:
    return SmtpConnector(local_hostname="mx.test.local", connect_timeout=2.0, **kwargs)


async def test_pipelined_transaction_is_two_writes(target: Target, writes: list[bytes]) -> None:
    target.behaviour.rcpt_replies = {f"gone@{DOMAIN}": "550 5.1.1 no such user"}
    session = await _connector().open(_hop(target.port), TlsMode.OFF)
    data = message_bytes(1, size=3000)
    writes.clear()
    replies = await session.send(_tx([f"a@{DOMAIN}", f"gone@{DOMAIN}", f"b@{DOMAIN}"], data))
    assert [r.code for r in replies] == [250, 550, 250]
    assert str(replies[1]) == "550 5.1.1 no such user"
    # MAIL, the three RCPTs and DATA in one write; the body with the final dot in the other.
    assert len(writes) == 2, writes
    assert writes[0].startswith(b"MAIL FROM:<s@src.test>") and writes[0].endswith(b"DATA\r\n")
    assert writes[0].count(b"RCPT TO:") == 3
    assert writes[1].endswith(b"\r\n.\r\n")
    assert target.recorder.deliveries() == [(f"a@{DOMAIN}", data), (f"b@{DOMAIN}", data)]
    await session.close()


async def test_without_pipelining_commands_go_one_at_a_time(
    target: Target, writes: list[bytes]
) -> None:
    target.behaviour.hidden_extensions = {"PIPELINING"}
    target.behaviour.rcpt_replies = {f"gone@{DOMAIN}": "550 5.1.1 no such user"}
    session = await _connector().open(_hop(target.port), TlsMode.OFF)
    data = message_bytes(2)
    writes.clear()
    replies = await session.send(_tx([f"gone@{DOMAIN}", f"a@{DOMAIN}"], data))
    assert [r.code for r in replies] == [550, 250]
    assert [w.split(b" ")[0].rstrip(b"\r\n") for w in writes[:4]] == [
        b"MAIL",
        b"RCPT",
        b"RCPT",
        b"DATA",
    ]
    # All refused: no DATA, and the next transaction starts with RSET.
    replies = await session.send(_tx([f"gone@{DOMAIN}"], data))
    assert [r.code for r in replies] == [550]
    replies = await session.send(_tx([f"a@{DOMAIN}"], data))
    assert [r.code for r in replies] == [250]
    assert b"RSET\r\n" in writes
    assert len(target.recorder.received) == 2
    await session.close()


async def test_refused_mail_from_is_every_recipients_reply(target: Target) -> None:
    session = await _connector().open(_hop(target.port), TlsMode.OFF)
    replies = await session.send(_tx([f"a@{DOMAIN}", f"b@{DOMAIN}"], b"x\r\n", mail_from="<>"))
    assert all(reply.code >= 500 for reply in replies), replies
    assert len({str(reply) for reply in replies}) == 1
    assert session.usable  # the session survives; the next transaction resets first
    replies = await session.send(_tx([f"a@{DOMAIN}"], b"x\r\n"))
    assert [r.code for r in replies] == [250]
    await session.close()


async def test_control_characters_in_the_envelope_are_refused(target: Target) -> None:
    session = await _connector().open(_hop(target.port), TlsMode.OFF)
    with pytest.raises(Unsupported, match="control characters"):
        await session.send(_tx([f"a@{DOMAIN}\r\nRCPT TO:<evil@x.test>"], b"x\r\n"))
    assert target.recorder.mail_commands == 0
    await session.close()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _scripted(handler: Handler) -> tuple[asyncio.Server, int]:
    """A hand-written SMTP server on 127.0.0.1 for the cases aiosmtpd cannot play."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, port


async def test_refused_greeting_is_a_connect_failure() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"554 5.7.1 go away\r\n")
        await writer.drain()

    server, port = await _scripted(handler)
    with pytest.raises(ConnectFailed, match=r"554 5\.7\.1 go away"):
        await _connector().open(_hop(port), TlsMode.OFF)
    server.close()


async def test_data_after_the_starttls_220_is_refused_and_nothing_is_sent() -> None:
    received: list[bytes] = []
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hi\r\n")
        while line := await reader.readline():
            received.append(line)
            if line.startswith(b"EHLO"):
                writer.write(b"250-hi\r\n250 STARTTLS\r\n")
            elif line.startswith(b"STARTTLS"):
                # A man in the middle appends a reply meant to be read after the handshake.
                writer.write(b"220 go ahead\r\n250 injected\r\n")
        closed.set()

    server, port = await _scripted(handler)
    with pytest.raises(TlsFailed, match="injection"):
        await _connector().open(_hop(port), TlsMode.REQUIRE)
    # Everything the client sent is read once the server sees it close the connection.
    await asyncio.wait_for(closed.wait(), 10)
    assert [line.split(b" ")[0].strip() for line in received] == [b"EHLO", b"STARTTLS"]
    server.close()


async def test_a_silent_hop_times_out_as_a_lost_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hi\r\n")
        while line := await reader.readline():
            if line.startswith(b"EHLO"):
                writer.write(b"250-hi\r\n250 PIPELINING\r\n")
            # MAIL, RCPT, DATA: never answered

    server, port = await _scripted(handler)
    connector = SmtpConnector(local_hostname="t", connect_timeout=2.0, command_timeout=0.3)
    session = await connector.open(_hop(port), TlsMode.OFF)
    with pytest.raises(ConnectionLost, match="TimeoutError"):
        await session.send(_tx([f"a@{DOMAIN}"], b"x\r\n"))
    assert not session.usable
    server.close()


async def test_multiline_replies_are_kept_on_one_ledger_line() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220-hi\r\n220 there\r\n")
        while line := await reader.readline():
            verb = line.split(b" ")[0].strip().upper()
            if verb == b"EHLO":
                writer.write(b"250-hi\r\n250-SIZE 1000\r\n250 PIPELINING\r\n")
            elif verb in (b"MAIL", b"RCPT"):
                writer.write(b"250 ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                while (await reader.readline()) != b".\r\n":
                    pass
                writer.write(b"250-2.0.0 Ok\r\n250 2.0.0 queued as X1\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")

    server, port = await _scripted(handler)
    session = await _connector().open(_hop(port), TlsMode.OFF)
    (reply,) = await session.send(_tx([f"a@{DOMAIN}"], b"x\r\n"))
    assert str(reply) == "250 2.0.0 Ok 2.0.0 queued as X1"
    await session.close()
    server.close()
