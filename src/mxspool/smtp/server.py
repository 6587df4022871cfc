"""The SMTP server protocol core: a sans-IO state machine in the style of h11.

Theory of operation
-------------------
The application owns the socket. It writes ``greeting()``, then loops: ``receive_data(bytes)``
for whatever arrived, and ``next_event()`` until it returns ``NEED_DATA`` or ``PAUSED``,
writing ``data_to_send()`` as it goes. The core never does I/O and never looks at a clock.

Replies. The core answers most commands itself (EHLO, NOOP, RSET, syntax and sequence errors,
limits it can check alone). Commands that need the application's judgment (MAIL, RCPT, DATA,
STARTTLS, and the end of the message content) become *decision events*; after one, the core
stops reading input and ``next_event()`` returns ``PAUSED`` until ``respond(reply)`` or
``accept()``. Since a command line is only parsed when nothing is pending, replies leave in
command order under PIPELINING (RFC 2920) even when the application decides asynchronously,
for instance after a durable commit; and the application controls how much input it buffers
by not reading while paused.

States::

    INIT --EHLO/HELO--> READY --MAIL 2xx--> MAIL --DATA 354--> DATA --end of content--> READY
      ^                   ^                  |  RSET, EHLO/HELO     |
      |                   +------------------+                      |
      +---- STARTTLS 220 (input buffered so far is discarded)       +-- (rejected content)
    any --QUIT--> CLOSED (all further input ignored)

In DATA every ``receive_data()`` piece goes to :class:`~mxspool.smtp.data.DataReader` whole
and comes back as at most one ``DataChunk``; the bytes after the end marker return to the
command parser. Content the core refuses (bare CR/LF in "reject" mode, over the size limit,
a line over 1000 octets, too many Received: fields) is still read to the genuine end marker,
then ``MessageRejected`` reports the reply already sent; clean content ends in the decision
event ``MessageComplete``.

STARTTLS (CVE-2011-0411): when the application accepts, everything received so far and not
yet parsed is dropped, so commands pipelined after STARTTLS in plaintext are never executed.
The application must write ``data_to_send()`` (the 220) and then start TLS before feeding any
more bytes.

Command lines are limited to 512 octets with the CRLF, MAIL and RCPT to 512 + 500 (RFC 1870,
RFC 3461 allowances). A line over the limit is answered 500 5.5.2 and skipped through its end
(its LF; in "normalize" mode its CR, LF or CRLF).
In "reject" mode a command line with a bare CR or LF is answered 500 5.5.2 Bare CR or LF not
allowed; in "normalize" mode a bare CR or LF ends the line.

Error limit (Postfix smtpd_hard_error_limit). ``errors`` counts the 4xx and 5xx replies of the
session, from the core or the application, to commands and to message content, as Postfix's
error count does, except the 452 4.5.3 to recipients past ``max_recipients`` (Postfix lets those
overshoot too); a message accepted with a 2xx forgives the errors before it. When ``errors``
reaches ``hard_error_limit`` (0: no limit) the core sends ``421 4.7.0 <hostname> Error: too many
errors`` right after the reply that reached it, sets ``closed_for_errors``, goes CLOSED (input
buffered but not yet parsed, pipelined commands included, is dropped unexecuted) and emits
``Quit``, so the application closes the connection as after QUIT.

STARTTLS is an EHLO extension (RFC 3207 4): before EHLO, or after HELO, it is refused with
503 5.5.1 Send EHLO first, as Exim does (Postfix accepts it).

Nothing from the client that could start a line reaches an event: EHLO/HELO names with a control
character (C0, DEL, C1) or U+2028/U+2029 are refused with 501, addresses by their grammar, and
ENVID/ORCPT whose decoded value is not printable US-ASCII with 501 (see ``params``). Replies
quote client text only through :func:`~mxspool.smtp.replies.echo` (64 printable characters).
"""

from __future__ import annotations

import enum
import functools
import re
from collections import deque
from dataclasses import dataclass

from mxspool.envelope import Envelope, MailParams, Recipient
from mxspool.smtp import replies as R
from mxspool.smtp.address import Path, parse_path, split_argument
from mxspool.smtp.data import BareNewlines, DataReader
from mxspool.smtp.events import (
    DECISION_EVENTS,
    NEED_DATA,
    PAUSED,
    DataChunk,
    DataStart,
    Event,
    Hello,
    MailFrom,
    MessageComplete,
    MessageRejected,
    ProtocolError,
    Quit,
    RcptTo,
    Reset,
    Sentinel,
    StartTLS,
)
from mxspool.smtp.headers import DEFAULT_LIMIT
from mxspool.smtp.params import parse_mail_params, parse_rcpt_params
from mxspool.smtp.replies import CommandError, Reply

__all__ = ["NEED_DATA", "PAUSED", "ServerConfig", "ServerConnection", "State"]

COMMAND_LINE_MAX = 510  # octets before CRLF (RFC 5321 4.5.3.1.4)
MAIL_RCPT_LINE_MAX = COMMAND_LINE_MAX + 500  # RFC 1870 6, RFC 3461 5
_EOL = re.compile(rb"[\r\n]")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_CONTROL_TEXT = re.compile("[\x80-\x9f\u2028\u2029]")  # C1 and line separators, once decoded
_NOT_IMPLEMENTED = frozenset({b"BDAT", b"ETRN", b"TURN", b"ATRN", b"SEND", b"SOML", b"SAML"})


@dataclass(frozen=True, slots=True)
class ServerConfig:
    hostname: str
    max_message_size: int = 150 * 1024 * 1024
    max_recipients: int = 1000
    bare_newlines: BareNewlines = "normalize"
    tls_available: bool = False
    max_received_headers: int = 50
    header_limit: int = DEFAULT_LIMIT
    hard_error_limit: int = 20  # 4xx/5xx replies before 421 and close; 0 = no limit


class State(enum.Enum):
    INIT = "INIT"  # no EHLO/HELO yet
    READY = "READY"  # greeted, no transaction
    MAIL = "MAIL"  # MAIL accepted; collecting recipients
    DATA = "DATA"  # reading content, or content ended and MessageComplete awaits an answer
    CLOSED = "CLOSED"


class ServerConnection:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.state = State.INIT
        self.extended = False
        self.helo_name: str | None = None
        self.tls_active = False
        self.mail_from: str | None = None  # "" for the null reverse-path
        self.mail_path: Path | None = None
        self.mail_params = MailParams()
        self.recipients: list[Recipient] = []
        self.errors = 0  # 4xx/5xx replies since the last accepted message
        self.closed_for_errors = False  # the core closed the session at hard_error_limit
        self._rcpt_attempted = False
        self._normalize = config.bare_newlines == "normalize"
        self._rx = bytearray()  # unparsed command-stream bytes, always before _chunks
        self._chunks: deque[bytes] = deque()  # received, not yet looked at
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._pending: Event | None = None
        self._discarding = False  # skipping the rest of an over-long line
        self._reader: DataReader | None = None

    # -- application interface ------------------------------------------------------------
    def greeting(self) -> bytes:
        return R.greeting(self.config.hostname).to_bytes()

    def timeout_reply(self) -> Reply:
        """The 421 to send when the application's idle timer fires; the core then closes."""
        self._close()
        return R.timeout(self.config.hostname)

    def receive_data(self, data: bytes) -> None:
        if data and self.state is not State.CLOSED:
            self._chunks.append(bytes(data))

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def paused(self) -> bool:
        return self._pending is not None

    def envelope(self) -> Envelope:
        return Envelope(
            mail_from=self.mail_from or "",
            mail_params=self.mail_params,
            recipients=tuple(self.recipients),
        )

    def next_event(self) -> Event | Sentinel:
        while True:
            if self._events:
                event = self._events.popleft()
                if isinstance(event, DECISION_EVENTS):
                    self._pending = event
                return event
            if self._pending is not None:
                return PAUSED
            if self.state is State.CLOSED:
                return NEED_DATA
            progressed = self._step_data() if self.state is State.DATA else self._step_command()
            if not progressed:
                return NEED_DATA

    def accept(self) -> None:
        """Answer the pending decision event with its default success reply."""
        event = self._pending
        if isinstance(event, MailFrom):
            self.respond(R.MAIL_OK)
        elif isinstance(event, RcptTo):
            self.respond(R.RCPT_OK)
        elif isinstance(event, DataStart):
            self.respond(R.START_DATA)
        elif isinstance(event, MessageComplete):
            self.respond(R.QUEUED)
        elif isinstance(event, StartTLS):
            self.respond(R.READY_FOR_TLS)
        else:
            raise RuntimeError("accept() without a pending decision event")

    def respond(self, reply: Reply) -> None:
        """Answer the pending decision event; the reply bytes go to data_to_send()."""
        event = self._pending
        if event is None:
            raise RuntimeError("respond() without a pending decision event")
        self._pending = None
        self._out += reply.to_bytes()
        ok = 200 <= reply.code < 300
        if isinstance(event, MailFrom):
            if ok:
                self._reset_transaction()
                self.mail_path = event.path
                self.mail_from = event.path.address
                self.mail_params = event.params
                self.state = State.MAIL
        elif isinstance(event, RcptTo):
            if ok:
                self.recipients.append(Recipient(event.path.address, event.params))
        elif isinstance(event, DataStart):
            if reply.code == 354:
                config = self.config
                self._reader = DataReader(
                    config.max_message_size, config.bare_newlines, config.header_limit
                )
                self.state = State.DATA
        elif isinstance(event, MessageComplete):
            self._reset_transaction()
            self.state = State.READY
            if ok:
                self.errors = 0  # Postfix: a delivered message forgives earlier errors
        elif isinstance(event, StartTLS) and reply.code == 220:
            # CVE-2011-0411: nothing that arrived before the handshake may be interpreted.
            self._rx.clear()
            self._chunks.clear()
            self._discarding = False
            self.tls_active = True
            self.extended = False
            self.helo_name = None
            self.state = State.INIT
        self._count_error(reply)

    # -- DATA -----------------------------------------------------------------------------
    def _step_data(self) -> bool:
        reader = self._reader
        assert reader is not None
        if self._rx:
            data = bytes(self._rx)
            self._rx.clear()
        elif self._chunks:
            data = self._chunks.popleft()
        else:
            return False
        piece, consumed, done = reader.feed(data)
        if piece:
            self._events.append(DataChunk(piece))
        if done:
            if consumed < len(data):
                self._rx += memoryview(data)[consumed:]
            self._end_of_content(reader)
        return True

    def _end_of_content(self, reader: DataReader) -> None:
        self._reader = None
        headers = reader.headers
        reply: Reply | None = None
        if reader.bare_newline and not self._normalize:
            reply = R.BARE_NEWLINE
        elif reader.too_big:
            reply = R.MESSAGE_TOO_BIG
        elif reader.line_too_long:
            reply = R.DATA_LINE_TOO_LONG
        elif headers.received_count >= self.config.max_received_headers:
            reply = R.MAIL_LOOP
        if reply is not None:
            self._out += reply.to_bytes()
            self._reset_transaction()
            self.state = State.READY
            self._events.append(MessageRejected(reply))
            self._count_error(reply)
            return
        self._events.append(
            MessageComplete(
                size=reader.size,
                received_count=headers.received_count,
                message_id=headers.message_id,
                header=headers.header,
                header_too_long=headers.too_long,
            )
        )

    # -- command lines --------------------------------------------------------------------
    def _step_command(self) -> bool:
        rx = self._rx
        while self._chunks:
            rx += self._chunks.popleft()
        if self._discarding:
            # Skip to the end of the over-long line: the next LF, or in "normalize" mode the
            # next CR, LF or CRLF, since that is where such a line ends there too.
            if self._normalize:
                m = _EOL.search(rx)
                i = -1 if m is None else m.start()
            else:
                i = rx.find(b"\n")
            if i < 0:
                rx.clear()
                return False
            if rx[i] == 0x0D:
                if i + 1 == len(rx):
                    del rx[:i]  # CRLF or bare CR: cannot tell yet
                    return False
                i += rx[i + 1] == 0x0A
            del rx[: i + 1]
            self._discarding = False
        if not rx:
            return False
        limit = (
            MAIL_RCPT_LINE_MAX if bytes(rx[:4]).upper() in (b"MAIL", b"RCPT") else COMMAND_LINE_MAX
        )
        if self._normalize:
            m = _EOL.search(rx, 0, limit + 2)
            i = -1 if m is None else m.start()
        else:
            i = rx.find(b"\n", 0, limit + 2)
        if i < 0:
            if len(rx) <= limit + 1:
                return False
            # No line end within the limit: answer now, skip to the next LF.
            self._discarding = True
            self._error(R.LINE_TOO_LONG, bytes(rx[:64]))
            return True
        if self._normalize:
            if rx[i] == 0x0D:
                if i + 1 == len(rx):
                    return False  # CRLF or bare CR: cannot tell yet
                end = i + 2 if rx[i + 1] == 0x0A else i + 1
            else:
                end = i + 1
            line = bytes(rx[:i])
            del rx[:end]
            bare = False
        else:
            line = bytes(rx[:i])
            del rx[: i + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
                bare = b"\r" in line
            else:
                bare = True
        if len(line) > limit:
            self._error(R.LINE_TOO_LONG, line)
        elif bare:
            self._error(R.BARE_NEWLINE, line)
        else:
            self._command(line)
        return True

    def _command(self, line: bytes) -> None:
        if not line:
            self._error(R.EMPTY_COMMAND, line)
            return
        if b"\x00" in line:
            self._error(R.NUL_NOT_ALLOWED, line)
            return
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        if verb == b"EHLO":
            self._hello(line, arg, extended=True)
        elif verb == b"HELO":
            self._hello(line, arg, extended=False)
        elif verb == b"MAIL":
            self._mail(line, arg)
        elif verb == b"RCPT":
            self._rcpt(line, arg)
        elif verb == b"DATA":
            self._data(line, arg)
        elif verb == b"RSET":
            self._rset(line, arg)
        elif verb == b"NOOP":
            self._reply(R.OK)
        elif verb == b"QUIT":
            self._reply(R.BYE)
            self._close()
            self._events.append(Quit())
        elif verb == b"VRFY":
            if arg.strip(b" "):
                self._reply(R.CANNOT_VRFY)
            else:
                self._error(R.syntax("VRFY address"), line)
        elif verb == b"EXPN":
            self._error(R.EXPN_DISABLED, line)
        elif verb == b"HELP":
            self._reply(R.HELP)
        elif verb == b"STARTTLS":
            self._starttls(line, arg)
        elif verb == b"AUTH":
            self._error(R.AUTH_NOT_OFFERED, line)
        elif verb in _NOT_IMPLEMENTED:
            self._error(R.NOT_IMPLEMENTED, line)
        else:
            self._error(R.UNRECOGNIZED, line)

    def _hello(self, line: bytes, arg: bytes, *, extended: bool) -> None:
        name = arg.strip(b" ")
        if not name:
            self._error(R.syntax("EHLO hostname" if extended else "HELO hostname"), line)
            return
        text = name.decode("utf-8", "replace")
        if _CONTROL.search(name) or _CONTROL_TEXT.search(text):
            self._error(R.HELO_CONTROL_CHARACTER, line)
            return
        if self.state is State.MAIL:
            self._reset_transaction()
            self._events.append(Reset())
        self.state = State.READY
        self.extended = extended
        self.helo_name = text
        config = self.config
        self._reply(
            _hello_reply(
                config.hostname,
                config.max_message_size,
                extended=extended,
                starttls=config.tls_available and not self.tls_active,
            )
        )
        self._events.append(Hello(self.helo_name, extended))

    def _mail(self, line: bytes, arg: bytes) -> None:
        if self.state is State.INIT:
            self._error(R.NEED_HELO, line)
            return
        if self.state is State.MAIL:
            self._error(R.NESTED_MAIL, line)
            return
        try:
            path_text, words = self._path_and_words(arg, "FROM")
            params = parse_mail_params(words)
            path = parse_path(path_text, reverse=True)
            if not params.smtputf8 and not path.ascii:
                raise CommandError(R.NEEDS_SMTPUTF8)
            if params.size is not None and params.size > self.config.max_message_size:
                raise CommandError(R.MESSAGE_TOO_BIG)
        except CommandError as exc:
            self._error(exc.reply, line)
            return
        self._events.append(MailFrom(path, params))

    def _rcpt(self, line: bytes, arg: bytes) -> None:
        if self.state is not State.MAIL:
            self._error(R.NEED_MAIL, line)
            return
        self._rcpt_attempted = True
        try:
            path_text, words = self._path_and_words(arg, "TO")
            params = parse_rcpt_params(words)
            path = parse_path(path_text, reverse=False)
            if not self.mail_params.smtputf8 and not path.ascii:
                raise CommandError(R.NEEDS_SMTPUTF8)
        except CommandError as exc:
            self._error(exc.reply, line)
            return
        if len(self.recipients) >= self.config.max_recipients:
            self._error(R.TOO_MANY_RECIPIENTS, line)
            return
        self._events.append(RcptTo(path, params))

    def _path_and_words(self, arg: bytes, keyword: str) -> tuple[str, list[str]]:
        if arg.isascii():
            text = arg.decode("ascii")
        else:
            try:
                text = arg.decode("utf-8")
            except UnicodeDecodeError:
                raise CommandError(R.BAD_UTF8) from None
        path_text, words = split_argument(text, keyword)
        if words and not self.extended:
            raise CommandError(R.ESMTP_PARAMS_AFTER_HELO)
        return path_text, words

    def _data(self, line: bytes, arg: bytes) -> None:
        if arg:
            self._error(R.syntax("DATA"), line)
        elif self.state is not State.MAIL:
            self._error(R.NEED_MAIL, line)
        elif not self.recipients:
            self._error(R.NO_VALID_RECIPIENTS if self._rcpt_attempted else R.NEED_RCPT, line)
        else:
            self._events.append(DataStart())

    def _rset(self, line: bytes, arg: bytes) -> None:
        if arg.strip(b" "):
            self._error(R.syntax("RSET"), line)
            return
        self._reset_transaction()
        self.state = State.INIT if self.helo_name is None else State.READY
        self._reply(R.OK)
        self._events.append(Reset())

    def _starttls(self, line: bytes, arg: bytes) -> None:
        if arg.strip(b" "):
            self._error(R.syntax("STARTTLS"), line)
        elif self.tls_active:
            self._error(R.TLS_ALREADY_ACTIVE, line)
        elif not self.config.tls_available:
            self._error(R.STARTTLS_NOT_OFFERED, line)
        elif not self.extended:
            self._error(R.STARTTLS_NEEDS_EHLO, line)
        elif self.state is State.MAIL:
            self._error(R.TRANSACTION_IN_PROGRESS, line)
        else:
            self._events.append(StartTLS())

    # -- helpers --------------------------------------------------------------------------
    def _reply(self, reply: Reply) -> None:
        self._out += reply.to_bytes()

    def _error(self, reply: Reply, command: bytes) -> None:
        self._out += reply.to_bytes()
        self._events.append(ProtocolError(reply, command[:64]))
        self._count_error(reply)

    def _count_error(self, reply: Reply) -> None:
        """Count a 4xx/5xx reply just sent; at ``hard_error_limit``, 421 and close."""
        if reply.code < 400 or reply == R.TOO_MANY_RECIPIENTS or self.state is State.CLOSED:
            return
        self.errors += 1
        limit = self.config.hard_error_limit
        if limit and self.errors >= limit:
            self._out += R.too_many_errors(self.config.hostname).to_bytes()
            self._close()
            self.closed_for_errors = True
            self._events.append(Quit())

    def _reset_transaction(self) -> None:
        self.mail_from = None
        self.mail_path = None
        self.mail_params = MailParams()
        self.recipients = []
        self._rcpt_attempted = False

    def _close(self) -> None:
        self.state = State.CLOSED
        self._rx.clear()
        self._chunks.clear()
        self._reader = None


@functools.lru_cache(maxsize=16)
def _hello_reply(hostname: str, max_size: int, *, extended: bool, starttls: bool) -> Reply:
    """The EHLO/HELO answer: the same for every session of a listener, so built once."""
    if not extended:
        return Reply(250, None, hostname)
    lines = [
        hostname,
        "PIPELINING",
        f"SIZE {max_size}",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "DSN",
    ]
    if starttls:
        lines.append("STARTTLS")
    return Reply(250, None, tuple(lines))
