"""Outbound SMTP: a small interface of ours, and its aiosmtplib implementation.

The default implementation is our own client in ``smtpclient`` (pipelined, fewer writes and
wake-ups per message); aiosmtplib stays as the reference the tests compare it with.

The scheduler only sees ``Connector.open(hop, tls) -> Session`` and ``Session.send(tx)``, which
returns one final reply per recipient. SMTP replies are results, not exceptions; anything that
breaks the session (connection, TLS, timeout) is mapped here, at the edge, to the exceptions in
``delivery.errors`` (httpcore style), so the two implementations are interchangeable.

TLS (per route, INTERFACE.md): ``verify`` and ``require`` need STARTTLS; when it is missing or
fails the session is closed before MAIL FROM, so nothing is ever sent in clear. ``verify``
checks the chain against the system CAs plus ``[delivery] ca_file`` and the hop's host name
(the route host or the MX host, never the address). ``opportunistic`` uses STARTTLS when
offered and, like Postfix, reconnects in clear when the handshake fails.

DATA is streamed from the store in pieces with our own dot-stuffing (see ``dotstuff``) and
write back-pressure, so neither a large message nor a slow hop grows memory.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import aiosmtplib

from mxspool.delivery.dotstuff import DotStuffer
from mxspool.delivery.errors import ConnectFailed, ConnectionLost, TlsFailed, Unsupported
from mxspool.delivery.reply import Reply
from mxspool.delivery.routing import Hop
from mxspool.envelope import MailParams, Recipient
from mxspool.store.base import TlsMode

COMMAND_TIMEOUT = 300.0  # RFC 5321 section 4.5.3.2: MAIL and RCPT 5 minutes
FINAL_REPLY_TIMEOUT = 600.0  # ... and 10 minutes for the reply to the final dot

_SMTP_FAILURES = (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError)


@dataclass(frozen=True, slots=True)
class Transaction:
    """One message to one hop: the stored envelope and a way to read the stored bytes."""

    mail_from: str
    mail_params: MailParams
    recipients: tuple[Recipient, ...]
    size: int
    """The stored size in bytes (for SIZE=, and to stop reading the body once it is all in)."""
    body: Callable[[], AsyncIterator[bytes]]
    """Called once per attempt; yields the message bytes exactly as stored."""


class Session(Protocol):
    """An open SMTP session with one hop, after EHLO (and STARTTLS when used)."""

    hop: Hop

    @property
    def usable(self) -> bool:
        """False once the hop closed or the session broke; open a new one then."""

    async def send(self, tx: Transaction) -> tuple[Reply, ...]:
        """Run one transaction; the final reply for each recipient, in order.

        Raises Unsupported (the message needs an extension the hop lacks) or ConnectionLost
        (the session broke; whatever was in flight is not delivered).
        """

    async def close(self) -> None: ...


class Connector(Protocol):
    async def open(self, hop: Hop, tls: TlsMode) -> Session:
        """Connect, EHLO, STARTTLS per ``tls``; raises ConnectFailed or TlsFailed."""


async def open_any(connector: Connector, hops: Sequence[Hop], tls: TlsMode) -> Session:
    """The first hop that gives a session, in order; raises when none does."""
    failures: list[ConnectFailed] = []
    for hop in hops:
        try:
            return await connector.open(hop, tls)
        except ConnectFailed as exc:
            failures.append(exc)
    reason = "; ".join(str(failure) for failure in failures) or "no hop to try"
    if len(reason) > 900:
        reason = reason[:900] + "..."
    if failures and all(isinstance(failure, TlsFailed) for failure in failures):
        raise TlsFailed(reason)
    raise ConnectFailed(reason)


def mail_arguments(tx: Transaction, offers: Callable[[str], bool]) -> list[bytes]:
    """MAIL FROM's arguments: the stored envelope's parameters the hop offers (shared by both
    clients, so the envelope on the wire does not depend on the implementation)."""
    params = tx.mail_params
    args = [b"FROM:<" + tx.mail_from.encode() + b">"]
    if offers("size"):
        args.append(b"SIZE=%d" % tx.size)
    if params.body and offers("8bitmime"):
        args.append(b"BODY=" + params.body.upper().encode())
    if params.smtputf8:
        args.append(b"SMTPUTF8")
    if offers("dsn"):
        if params.ret:
            args.append(b"RET=" + params.ret.encode())
        if params.envid:
            args.append(b"ENVID=" + params.envid.encode())
    return args


def rcpt_arguments(recipient: Recipient, offers: Callable[[str], bool]) -> list[bytes]:
    """RCPT TO's arguments, with the DSN parameters when the hop offers DSN."""
    args = [b"TO:<" + recipient.address.encode() + b">"]
    if offers("dsn"):
        if recipient.params.notify:
            args.append(b"NOTIFY=" + ",".join(recipient.params.notify).encode())
        if recipient.params.orcpt:
            args.append(b"ORCPT=" + recipient.params.orcpt.encode())
    return args


def check_extensions(tx: Transaction, offers: Callable[[str], bool], hop: Hop) -> None:
    """Raise Unsupported when the message needs an extension the hop lacks (no conversion)."""
    if (tx.mail_params.body or "").upper() == "8BITMIME" and not offers("8bitmime"):
        raise Unsupported(
            f"{hop} does not offer 8BITMIME and the message is 8-bit (BODY=8BITMIME); "
            "mxspool does not convert messages: route it to a hop that offers 8BITMIME"
        )
    if tx.mail_params.smtputf8 and not offers("smtputf8"):
        raise Unsupported(
            f"{hop} does not offer SMTPUTF8 and the message needs it; "
            "route it to a hop that offers SMTPUTF8"
        )


def tls_contexts(ca_file: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(for ``verify``: system CAs plus ``ca_file``, host name checked; for ``require``: any)."""
    verify = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file:
        verify.load_verify_locations(cafile=ca_file)
    any_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    any_cert.check_hostname = False
    any_cert.verify_mode = ssl.CERT_NONE
    return verify, any_cert


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {exc.message}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ConnectorBase:
    """What every ``Connector`` shares: its settings, TLS contexts, and the opportunistic
    fallback; an implementation provides ``_open``."""

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

    async def open(self, hop: Hop, tls: TlsMode) -> Session:
        try:
            return await self._open(hop, tls)
        except TlsFailed:
            if tls is not TlsMode.OPPORTUNISTIC:
                raise
            # Like Postfix: a failed handshake is retried in clear on a new connection.
            return await self._open(hop, TlsMode.OFF)

    async def _open(self, hop: Hop, tls: TlsMode) -> Session:
        raise NotImplementedError


class AiosmtplibConnector(ConnectorBase):
    """``Connector`` on aiosmtplib."""

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
        return Reply(response.code, response.message)

    def _mail_args(self, tx: Transaction) -> list[bytes]:
        return mail_arguments(tx, self._offers)

    def _rcpt_args(self, recipient: Recipient) -> list[bytes]:
        return rcpt_arguments(recipient, self._offers)

    def _check_extensions(self, tx: Transaction) -> None:
        check_extensions(tx, self._offers, self.hop)

    async def send(self, tx: Transaction) -> tuple[Reply, ...]:
        self._check_extensions(tx)
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
            # Anything else mid-transaction (a store read error, cancellation): never send the
            # final dot after a partial body; dropping the connection makes the hop discard it.
            self._abort()
            raise

    async def _transaction(self, tx: Transaction) -> tuple[Reply, ...]:
        if self._in_transaction:
            # The previous transaction was abandoned (refused MAIL/RCPT/DATA): reset first.
            # After a completed DATA the hop has reset itself (RFC 5321 4.1.1.4): no RSET.
            reset = await self._command(b"RSET")
            if not reset.positive:
                self._broken = True
                raise ConnectionLost(f"{self.hop}: RSET refused: {reset}")
        self._in_transaction = True
        mail = await self._command(b"MAIL", *self._mail_args(tx))
        if not mail.positive:
            return tuple(mail for _ in tx.recipients)
        replies = [await self._command(b"RCPT", *self._rcpt_args(r)) for r in tx.recipients]
        if not any(reply.positive for reply in replies):
            return tuple(replies)
        start = await self._command(b"DATA")
        if start.code != 354:
            return tuple(start if reply.positive else reply for reply in replies)
        final = await self._stream(tx)
        self._in_transaction = False
        return tuple(final if reply.positive else reply for reply in replies)

    async def _stream(self, tx: Transaction) -> Reply:
        protocol = self._smtp.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost before DATA")
        stuffer = DotStuffer()
        sent = 0
        held = b""  # the last piece goes out with the end marker: one write fewer per message
        pieces = tx.body()
        try:
            async for piece in pieces:
                if held:
                    protocol.write(held)
                    # Back-pressure: wait while the transport's buffer is above its high mark.
                    await protocol._drain_helper()
                held = stuffer.feed(piece)
                sent += len(piece)
                if sent >= tx.size > 0:
                    break  # all stored bytes read: skip the store's final empty read
        finally:
            # Stopping early leaves the store's generator suspended: close it now.
            close = getattr(pieces, "aclose", None)
            if close is not None:
                await close()
        protocol.write(held + stuffer.finish())
        response = await protocol.read_response(timeout=self._final_timeout)
        if response.code == 421:
            self._broken = True
        return Reply(response.code, response.message)

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
