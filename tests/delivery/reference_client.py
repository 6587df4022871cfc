"""The reference ``Connector`` on aiosmtplib, for tests only.

mxspool has one outbound SMTP client (``mxspool.delivery.smtpclient``). This second
implementation of the same interface, on an independent SMTP library, is what the fault tests
compare it with (``tests/delivery/test_faults.py`` runs every fault against both): the same
wire, the same outcomes. It follows the same TLS rules (``verify``/``require`` never send MAIL in
clear; ``opportunistic`` reconnects in clear when the handshake fails) and sends the same
envelope (``transport.mail_arguments`` / ``rcpt_arguments``), without pipelining.
"""

from __future__ import annotations

import asyncio

import aiosmtplib

from mxspool.delivery.dotstuff import DotStuffer
from mxspool.delivery.errors import ConnectFailed, ConnectionLost, TlsFailed, Unsupported
from mxspool.delivery.routing import Hop
from mxspool.delivery.transport import (
    COMMAND_TIMEOUT,
    FINAL_REPLY_TIMEOUT,
    Transaction,
    check_extensions,
    mail_arguments,
    rcpt_arguments,
    tls_contexts,
)
from mxspool.envelope import Recipient
from mxspool.smtp.replies import Reply
from mxspool.store.base import TlsMode

_SMTP_FAILURES = (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {exc.message}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _reply(response: aiosmtplib.SMTPResponse) -> Reply:
    return Reply.parse(response.code, response.message.split("\n"))


class AiosmtplibConnector:
    """``Connector`` on aiosmtplib."""

    def __init__(
        self,
        *,
        local_hostname: str,
        connect_timeout: float = 30.0,
        ca_file: str = "",
        command_timeout: float = COMMAND_TIMEOUT,
        final_timeout: float = FINAL_REPLY_TIMEOUT,
    ) -> None:
        self.local_hostname = local_hostname
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.final_timeout = final_timeout
        self._verify, self._any_cert = tls_contexts(ca_file)

    async def open(self, hop: Hop, tls: TlsMode) -> _AiosmtplibSession:
        try:
            return await self._open(hop, tls)
        except TlsFailed:
            if tls is not TlsMode.OPPORTUNISTIC:
                raise
            return await self._open(hop, TlsMode.OFF)

    async def _open(self, hop: Hop, tls: TlsMode) -> _AiosmtplibSession:
        smtp = aiosmtplib.SMTP(
            hostname=hop.address,
            port=hop.port,
            local_hostname=self.local_hostname,
            timeout=self.connect_timeout,
            start_tls=False,  # aiosmtplib would otherwise decide on its own
            use_tls=False,
        )
        try:
            await smtp.connect()
            await _hello(smtp, self.connect_timeout)
        except _SMTP_FAILURES as exc:
            smtp.close()
            raise ConnectFailed(f"{hop}: {_describe(exc)}") from exc
        session = _AiosmtplibSession(smtp, hop, self.command_timeout, self.final_timeout)
        if tls is TlsMode.OFF:
            return session
        if not smtp.supports_extension("starttls"):
            if tls is TlsMode.OPPORTUNISTIC:
                return session
            await session.close()
            raise TlsFailed(
                f"{hop} does not offer STARTTLS and the route requires TLS (tls={tls.value}); "
                "nothing was sent"
            )
        context = self._verify if tls is TlsMode.VERIFY else self._any_cert
        try:
            await smtp.starttls(
                server_hostname=hop.name, tls_context=context, timeout=self.connect_timeout
            )
            await _hello(smtp, self.connect_timeout)
        except _SMTP_FAILURES as exc:
            smtp.close()  # no QUIT: the TLS state is unknown, and nothing more goes in clear
            raise TlsFailed(f"TLS with {hop} failed: {_describe(exc)}; nothing was sent") from exc
        return session


async def _hello(smtp: aiosmtplib.SMTP, seconds: float) -> None:
    try:
        await smtp.ehlo(timeout=seconds)
    except aiosmtplib.SMTPHeloError:
        if not smtp.is_connected:
            raise
        await smtp.helo(timeout=seconds)


class _AiosmtplibSession:
    def __init__(
        self, smtp: aiosmtplib.SMTP, hop: Hop, command_timeout: float, final_timeout: float
    ) -> None:
        self.hop = hop
        self._smtp = smtp
        self._command_timeout = command_timeout
        self._final_timeout = final_timeout
        self._in_transaction = False
        self._broken = False

    @property
    def usable(self) -> bool:
        return not self._broken and self._smtp.is_connected

    def _offers(self, extension: str) -> bool:
        return self._smtp.supports_extension(extension)

    async def _command(self, *args: bytes) -> Reply:
        response = await self._smtp.execute_command(*args, timeout=self._command_timeout)
        if response.code == 421:
            self._broken = True  # the hop is closing the session (aiosmtplib closed it too)
        return _reply(response)

    async def send(self, tx: Transaction) -> tuple[Reply, ...]:
        check_extensions(tx, self._offers, self.hop)
        try:
            return await self._transaction(tx)
        except ValueError as exc:
            # aiosmtplib refuses control characters in command arguments (injection guard).
            self._abort()
            raise Unsupported(f"envelope cannot be sent to {self.hop}: {exc}") from exc
        except _SMTP_FAILURES as exc:
            self._abort()
            raise ConnectionLost(f"{self.hop}: {_describe(exc)}") from exc
        except BaseException:
            self._abort()
            raise

    async def _transaction(self, tx: Transaction) -> tuple[Reply, ...]:
        if self._in_transaction:
            reset = await self._command(b"RSET")
            if not reset.positive:
                self._broken = True
                raise ConnectionLost(f"{self.hop}: RSET refused: {reset}")
        self._in_transaction = True
        mail = await self._command(b"MAIL", *mail_arguments(tx, self._offers))
        if not mail.positive:
            return tuple(mail for _ in tx.recipients)
        replies = [await self._command(b"RCPT", *self._rcpt(r)) for r in tx.recipients]
        if not any(reply.positive for reply in replies):
            return tuple(replies)
        start = await self._command(b"DATA")
        if start.code != 354:
            return tuple(start if reply.positive else reply for reply in replies)
        final = await self._stream(tx)
        self._in_transaction = False
        return tuple(final if reply.positive else reply for reply in replies)

    def _rcpt(self, recipient: Recipient) -> list[bytes]:
        return rcpt_arguments(recipient, self._offers)

    async def _stream(self, tx: Transaction) -> Reply:
        protocol = self._smtp.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost before DATA")
        stuffer = DotStuffer()
        sent = 0
        held = b""
        pieces = tx.body()
        try:
            async for piece in pieces:
                if held:
                    protocol.write(held)
                    await protocol._drain_helper()
                held = stuffer.feed(piece)
                sent += len(piece)
                if sent >= tx.size > 0:
                    break
        finally:
            close = getattr(pieces, "aclose", None)
            if close is not None:
                await close()
        protocol.write(held + stuffer.finish())
        response = await protocol.read_response(timeout=self._final_timeout)
        if response.code == 421:
            self._broken = True
        return _reply(response)

    def _abort(self) -> None:
        self._broken = True
        self._smtp.close()

    async def close(self) -> None:
        if self._smtp.is_connected and not self._broken:
            try:
                await self._smtp.quit(timeout=5.0)
            except _SMTP_FAILURES:
                pass
        self._broken = True
        self._smtp.close()
