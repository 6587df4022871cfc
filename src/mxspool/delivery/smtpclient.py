"""The outbound SMTP client: an asyncio Protocol, pipelined, the one ``Connector`` of mxspool.

Every outbound SMTP conversation goes through it: delivery (the scheduler), DSNs (``queue
bounce``), the flow probe (``probe``) and the route checks (``check route``, ``check
recipients``). Delivery and DSNs use the ``Connector``/``Session`` interface of ``transport``;
the probes use the same session one step at a time (``SmtpConnector.connect``, ``starttls``,
``SmtpSession.command``, ``content``), since they need what delivery never does: every RCPT
reply, then RSET and no DATA, the certificate, the latency.

Theory of operation
-------------------
Delivery is CPU-bound in a release (thousands of small messages over a few reused sessions),
so this client spends as little as possible per message: no streams, no per-command locks or
tasks, and as few writes and wake-ups as the protocol allows. ``_Wire`` is the Protocol: it
keeps received bytes in a buffer, cuts complete replies out of it (RFC 5321 section 4.2:
``ddd-text`` continues a reply, ``ddd text`` ends it) and hands them over in order; a caller
asks for the next ``n`` replies and is woken once, when all ``n`` are in. Replies are the SMTP
core's ``Reply`` (``smtp.replies``), the same type the server sends.

A transaction with PIPELINING (RFC 2920) is two round trips and two writes: MAIL, every RCPT
and DATA in one write, then, after 354, the dot-stuffed body with the final "." in the same
write (a large body goes out piece by piece, with write back-pressure). Every reply of the
group is read and checked, as RFC 2920 requires; after a refused MAIL, the RCPT and DATA
replies are read and dropped. When DATA gets 354 although no recipient was accepted (which
RFC 2920 forbids but some servers do), an empty message ("." alone) ends the transaction,
which the hop must refuse for lack of recipients. Without PIPELINING the same commands go one
at a time.

TLS (per route): ``verify`` and ``require`` need STARTTLS; when it is missing or fails the
session is closed before MAIL FROM, so nothing is ever sent in clear. ``verify`` checks the
chain against the system CAs plus ``[delivery] ca_file`` and the hop's host name (the route
host or the MX host, never the address). ``opportunistic`` uses STARTTLS when offered and, like
Postfix, reconnects in clear when the handshake fails. Bytes that arrive after the 220 to
STARTTLS and before the handshake are an injection attempt (CVE-2011-0411 style): the session
is dropped, nothing is sent. Replies are results; broken sessions, timeouts and protocol
garbage are mapped to ``delivery.errors`` at this edge.

Outbound identity (``identity``): a connection binds ``[delivery] source_address`` of the
hop's IP version (when one is configured), and both TLS contexts carry the client certificate,
which OpenSSL presents when the hop asks for one (a TLS server may or may not ask; Python's ssl
does not say whether it did, only whether the handshake succeeded).

Timeouts: ``connect_timeout`` bounds the connection, greeting, EHLO and the TLS handshake;
``command_timeout`` each command's reply (RFC 5321 4.5.3.2: 5 minutes); ``final_timeout`` the
reply to the final dot (10 minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections import deque
from collections.abc import AsyncGenerator, Iterator
from typing import cast

from mxspool.delivery.dotstuff import DotStuffer
from mxspool.delivery.errors import ConnectFailed, ConnectionLost, TlsFailed, Unsupported
from mxspool.delivery.identity import NO_IDENTITY, OutboundIdentity
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
from mxspool.smtp.replies import Reply
from mxspool.store.base import TlsMode

MAX_REPLY_LINE = 4096
"""RFC 5321 allows 512 octets; real servers send longer lines, but not this long."""
MAX_REPLY_LINES = 512
QUIT_TIMEOUT = 5.0


class _ProtocolError(Exception):
    """The hop sent something that is not an SMTP reply; the session cannot continue."""


class _Wire(asyncio.Protocol):
    """Bytes in, replies out; writes with back-pressure. One per connection."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        self._lines: list[str] = []
        self._replies: deque[Reply] = deque()
        self._want = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self._paused = False
        self._drained: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            start = end + 1
            try:
                self._line(line[:-1] if line.endswith(b"\r") else line)
            except _ProtocolError as exc:
                self._fail(exc)
                if self.transport is not None:
                    self.transport.abort()
                return
        self._buffer = buffer[start:]
        if len(self._buffer) > MAX_REPLY_LINE:
            self._fail(_ProtocolError(f"reply line longer than {MAX_REPLY_LINE} bytes"))
            if self.transport is not None:
                self.transport.abort()
            return
        if self._waiter is not None and len(self._replies) >= self._want:
            if not self._waiter.done():
                self._waiter.set_result(None)
            self._waiter = None

    def _line(self, line: bytes) -> None:
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
            raise _ProtocolError(f"not an SMTP reply: {line[:80]!r}")
        if len(line) > MAX_REPLY_LINE or len(self._lines) >= MAX_REPLY_LINES:
            raise _ProtocolError("reply too long")
        self._lines.append(line[4:].decode("utf-8", "replace"))
        if line[3:4] != b"-":
            try:
                reply = Reply.parse(int(line[:3]), self._lines)
            except ValueError:
                raise _ProtocolError(f"not an SMTP reply code: {line[:80]!r}") from None
            self._replies.append(reply)
            self._lines = []

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"{type(exc).__name__}: {exc}" if exc else "closed by the hop"
        self._fail(ConnectionLost(f"Connection lost ({reason})"))
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._waiter = None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # -- for the session ----------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return (
            self._error is None and self.transport is not None and not self.transport.is_closing()
        )

    @property
    def unread(self) -> bool:
        """True when bytes or replies arrived that nobody asked for yet."""
        return bool(self._buffer or self._lines or self._replies)

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's buffer is above its high-water mark."""
        if self._paused and self._error is None:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
        if self._error is not None:
            raise self._error

    async def replies(self, count: int, within: float) -> list[Reply]:
        """The next ``count`` replies, in order; raises ConnectionLost, _ProtocolError, Timeout."""
        if len(self._replies) < count:
            if self._error is not None:
                raise self._error
            self._want = count
            self._waiter = asyncio.get_running_loop().create_future()
            async with asyncio.timeout(within):
                await self._waiter
            if len(self._replies) < count:
                assert self._error is not None
                raise self._error
        return [self._replies.popleft() for _ in range(count)]

    def reset_for_tls(self) -> None:
        self._paused = False


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BYTES = re.compile(rb"[\x00-\x1f\x7f]")
_BROKEN = (OSError, TimeoutError, ConnectionLost, _ProtocolError)
"""What breaks a session (ssl.SSLError is an OSError); mapped to ``delivery.errors`` here."""


def _check_envelope(tx: Transaction, hop: Hop) -> None:
    """No CR, LF or other control characters in anything that goes on a command line."""
    params = tx.mail_params
    values = [tx.mail_from, params.body or "", params.ret or "", params.envid or ""]
    for recipient in tx.recipients:
        values += [
            recipient.address,
            recipient.params.orcpt or "",
            *(recipient.params.notify or ()),
        ]
    if _CONTROL.search("".join(values)):
        raise Unsupported(
            f"envelope cannot be sent to {hop}: it contains control characters "
            "(which would split an SMTP command)"
        )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class SmtpConnector:
    """The ``Connector``: opens sessions per the route's TLS mode (see the module docstring).

    ``connect`` and ``starttls`` are the two steps of ``open``, for callers that apply their
    own TLS policy (the route checks look at a certificate that delivery would refuse).
    """

    def __init__(
        self,
        *,
        local_hostname: str,
        connect_timeout: float = 30.0,
        ca_file: str = "",
        command_timeout: float = COMMAND_TIMEOUT,
        final_timeout: float = FINAL_REPLY_TIMEOUT,
        identity: OutboundIdentity = NO_IDENTITY,
    ) -> None:
        self.local_hostname = local_hostname
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.final_timeout = final_timeout
        self.identity = identity
        self._verify, self._any_cert = tls_contexts(ca_file)
        identity.load_into(self._verify)
        identity.load_into(self._any_cert)

    async def open(self, hop: Hop, tls: TlsMode) -> SmtpSession:
        """Connect, EHLO, STARTTLS per ``tls``; raises ConnectFailed or TlsFailed."""
        try:
            return await self._open(hop, tls)
        except TlsFailed:
            if tls is not TlsMode.OPPORTUNISTIC:
                raise
            # Like Postfix: a failed handshake is retried in clear on a new connection.
            return await self._open(hop, TlsMode.OFF)

    async def _open(self, hop: Hop, tls: TlsMode) -> SmtpSession:
        session = await self.connect(hop)
        if tls is TlsMode.OFF:
            return session
        if not session.offers("starttls"):
            if tls is TlsMode.OPPORTUNISTIC:
                return session
            await session.close()
            raise TlsFailed(
                f"{hop} does not offer STARTTLS and the route requires TLS (tls={tls.value}); "
                "nothing was sent"
            )
        await self.starttls(session, verify=tls is TlsMode.VERIFY)
        return session

    async def connect(self, hop: Hop) -> SmtpSession:
        """Connect, read the greeting, EHLO (HELO when refused); no TLS yet.

        Raises ConnectFailed (refused, timeout, a greeting other than 220, garbage).
        """
        loop = asyncio.get_running_loop()
        wire = _Wire()
        source = self.identity.source_for(hop.address)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(
                    lambda: wire,
                    hop.address,
                    hop.port,
                    local_addr=(source, 0) if source else None,
                )
                (greeting,) = await wire.replies(1, self.connect_timeout)
                if greeting.code != 220:
                    raise ConnectFailed(f"{hop}: refused the session: {greeting}")
                extensions = await self._hello(wire)
        except ConnectFailed:
            _abort(wire)
            raise
        except _BROKEN as exc:
            _abort(wire)
            where = f" from {source}" if source else ""
            raise ConnectFailed(f"{hop}{where}: {_describe(exc)}") from exc
        return SmtpSession(wire, hop, greeting, extensions, self)

    async def starttls(self, session: SmtpSession, *, verify: bool) -> None:
        """STARTTLS and EHLO again over TLS; with ``verify`` the certificate must be valid for
        the hop's name (else any certificate is taken).

        Raises TlsFailed (the connection is dropped then, without QUIT: the TLS state is unknown
        and nothing more goes in clear); its ``__cause__`` is the ssl error, if any.
        """
        context = self._verify if verify else self._any_cert
        try:
            session.extensions = await self._starttls(session._wire, session.hop, context)
        except _BROKEN as exc:
            session._abort()
            raise TlsFailed(
                f"TLS with {session.hop} failed: {_describe(exc)}; nothing was sent"
            ) from exc

    async def _hello(self, wire: _Wire) -> dict[str, str]:
        """EHLO (HELO when refused); the extensions offered, keyword (lower case) -> params."""
        name = self.local_hostname.encode()
        wire.write(b"EHLO " + name + b"\r\n")
        (reply,) = await wire.replies(1, self.connect_timeout)
        if reply.code == 250:
            extensions: dict[str, str] = {}
            for line in reply.lines[1:]:
                keyword, _, params = line.strip().partition(" ")
                if keyword:
                    extensions[keyword.lower()] = params
            return extensions
        wire.write(b"HELO " + name + b"\r\n")
        (reply,) = await wire.replies(1, self.connect_timeout)
        if reply.code != 250:
            raise ConnectFailed(f"refused EHLO and HELO: {reply}")
        return {}

    async def _starttls(self, wire: _Wire, hop: Hop, context: ssl.SSLContext) -> dict[str, str]:
        wire.write(b"STARTTLS\r\n")
        (reply,) = await wire.replies(1, self.connect_timeout)
        if reply.code != 220:
            raise _ProtocolError(f"STARTTLS refused: {reply}")
        if wire.unread:
            raise _ProtocolError("the hop sent data after its 220 to STARTTLS (injection?)")
        assert wire.transport is not None
        loop = asyncio.get_running_loop()
        wire.reset_for_tls()
        async with asyncio.timeout(self.connect_timeout):
            transport = await loop.start_tls(
                wire.transport,
                wire,
                context,
                server_hostname=hop.name,
                ssl_handshake_timeout=self.connect_timeout,
            )
        if transport is None:
            raise ConnectionLost("the connection closed during the TLS handshake")
        wire.transport = transport
        # RFC 3207: forget what was learnt in clear and ask again over TLS.
        return await self._hello(wire)


def _abort(wire: _Wire) -> None:
    if wire.transport is not None:
        wire.transport.abort()


class SmtpSession:
    """One connection to one hop, after EHLO (and STARTTLS when used); reused for many messages."""

    def __init__(
        self,
        wire: _Wire,
        hop: Hop,
        greeting: Reply,
        extensions: dict[str, str],
        connector: SmtpConnector,
    ) -> None:
        self.hop = hop
        self.greeting = greeting
        self.extensions = extensions
        """The extensions offered in the last EHLO: keyword (lower case) -> parameters."""
        self._wire = wire
        self._command_timeout = connector.command_timeout
        self._final_timeout = connector.final_timeout
        self._in_transaction = False
        self._broken = False

    @property
    def usable(self) -> bool:
        return not self._broken and self._wire.alive

    @property
    def local_address(self) -> str | None:
        """The address this connection leaves from (the source the hop sees, before NAT)."""
        transport = self._wire.transport
        found = transport.get_extra_info("sockname") if transport is not None else None
        return str(found[0]) if isinstance(found, tuple) and found else None

    @property
    def ssl_object(self) -> ssl.SSLObject | ssl.SSLSocket | None:
        """The TLS connection after STARTTLS (version, cipher, peer certificate); else None."""
        transport = self._wire.transport
        found = transport.get_extra_info("ssl_object") if transport is not None else None
        return found if isinstance(found, ssl.SSLObject | ssl.SSLSocket) else None

    def offers(self, extension: str) -> bool:
        """Whether the hop offers ``extension`` (lower case: "starttls", "size")."""
        return extension in self.extensions

    async def send(self, tx: Transaction) -> tuple[Reply, ...]:
        """Run one transaction; the final reply for each recipient, in order.

        Raises Unsupported (the message needs an extension the hop lacks, or its envelope
        cannot go on a command line) or ConnectionLost (the session broke).
        """
        check_extensions(tx, self.offers, self.hop)
        _check_envelope(tx, self.hop)
        try:  # what ``_breaks`` does, inline: this is delivery's hot path
            return await self._transaction(tx)
        except _BROKEN as exc:
            self._abort()
            raise ConnectionLost(f"{self.hop}: {_describe(exc)}") from exc
        except BaseException:
            self._abort()
            raise

    async def command(self, *words: bytes) -> Reply:
        """One command (words joined by spaces, CRLF added) and its reply, for the probes.

        A transaction started this way is the caller's to end (RSET, or DATA and ``content``).
        Raises Unsupported (a control character in the command) or ConnectionLost.
        """
        line = b" ".join(words)
        if _CONTROL_BYTES.search(line):
            raise Unsupported(
                f"command for {self.hop} contains control characters: {line[:80]!r}; not sent"
            )
        with self._breaks():
            return await self._command(line + b"\r\n")

    async def content(self, tx: Transaction) -> Reply:
        """After a 354 to DATA sent with ``command``: ``tx``'s message, dot-stuffed, with the
        end marker, and the final reply. Raises ConnectionLost."""
        with self._breaks():
            return await self._stream(tx)

    @contextlib.contextmanager
    def _breaks(self) -> Iterator[None]:
        """A failure in the middle of an exchange ends the session (mapped to ConnectionLost)."""
        try:
            yield
        except _BROKEN as exc:
            self._abort()
            raise ConnectionLost(f"{self.hop}: {_describe(exc)}") from exc
        except BaseException:
            # Anything else mid-transaction (a store read error, cancellation): never send the
            # final dot after a partial body; dropping the connection makes the hop discard it.
            self._abort()
            raise

    def _seen(self, replies: list[Reply]) -> list[Reply]:
        if any(reply.code == 421 for reply in replies):
            self._broken = True  # the hop is closing the session
        return replies

    async def _transaction(self, tx: Transaction) -> tuple[Reply, ...]:
        mail = b"MAIL " + b" ".join(mail_arguments(tx, self.offers)) + b"\r\n"
        rcpts = [
            b"RCPT " + b" ".join(rcpt_arguments(r, self.offers)) + b"\r\n" for r in tx.recipients
        ]
        reset = self._in_transaction
        # The previous transaction was abandoned (refused MAIL/RCPT/DATA): RSET first. After a
        # completed DATA the hop has reset itself (RFC 5321 4.1.1.4): no RSET then.
        self._in_transaction = True
        if self.offers("pipelining"):
            group = [b"RSET\r\n"] if reset else []
            group += [mail, *rcpts, b"DATA\r\n"]
            self._wire.write(b"".join(group))
            replies = self._seen(await self._wire.replies(len(group), self._command_timeout))
            if reset:
                self._check_reset(replies.pop(0))
            mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
            if not mail_reply.positive:
                if data_reply.code == 354:
                    await self._end_empty()
                return tuple(mail_reply for _ in tx.recipients)
            if not any(reply.positive for reply in rcpt_replies):
                if data_reply.code == 354:
                    await self._end_empty()
                return tuple(rcpt_replies)
        else:
            if reset:
                self._check_reset(await self._command(b"RSET\r\n"))
            mail_reply = await self._command(mail)
            if not mail_reply.positive:
                return tuple(mail_reply for _ in tx.recipients)
            rcpt_replies = [await self._command(rcpt) for rcpt in rcpts]
            if not any(reply.positive for reply in rcpt_replies):
                return tuple(rcpt_replies)
            data_reply = await self._command(b"DATA\r\n")
        if data_reply.code != 354:
            return tuple(data_reply if reply.positive else reply for reply in rcpt_replies)
        final = await self._stream(tx)
        self._in_transaction = False
        return tuple(final if reply.positive else reply for reply in rcpt_replies)

    async def _command(self, line: bytes) -> Reply:
        self._wire.write(line)
        return self._seen(await self._wire.replies(1, self._command_timeout))[0]

    def _check_reset(self, reply: Reply) -> None:
        if not reply.positive:
            self._broken = True
            raise ConnectionLost(f"RSET refused: {reply}")

    async def _end_empty(self) -> None:
        """End a DATA the hop should not have started: "." alone, reply read and dropped."""
        self._wire.write(b".\r\n")
        self._seen(await self._wire.replies(1, self._final_timeout))

    async def _stream(self, tx: Transaction) -> Reply:
        wire = self._wire
        stuffer = DotStuffer()
        sent = 0
        held = b""  # the last piece goes out with the end marker: one write per small message
        pieces = tx.body()
        try:
            async for piece in pieces:
                if held:
                    wire.write(held)
                    await wire.drain()
                held = stuffer.feed(piece)
                sent += len(piece)
                if sent >= tx.size > 0:
                    break  # all stored bytes read: skip the store's final empty read
        finally:
            # Stopping early leaves the store's generator suspended: close it now.
            if isinstance(pieces, AsyncGenerator):
                await pieces.aclose()
        wire.write(held + stuffer.finish())
        (final,) = self._seen(await wire.replies(1, self._final_timeout))
        return final

    def _abort(self) -> None:
        self._broken = True
        _abort(self._wire)

    async def close(self) -> None:
        if self.usable:
            try:
                self._wire.write(b"QUIT\r\n")
                await self._wire.replies(1, QUIT_TIMEOUT)
            except _BROKEN:
                pass
        self._broken = True
        if self._wire.transport is not None:
            self._wire.transport.close()
