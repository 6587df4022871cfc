"""SMTP replies: one value type, for the replies the server sends and those the client receives,
and the standard replies the server sends.

Enhanced status codes (RFC 3463, RFC 2034) are sent on every reply except the greeting and the
EHLO/HELO answer, whether or not the client said EHLO: Postfix does the same, clients ignore what
they did not ask for, and it keeps every reply a constant.

A received reply (``Reply.parse``, used by the outbound client) keeps its text as the hop sent
it; ``str(reply)`` is its one-line form, the one the delivery ledger records.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True, slots=True, init=False)
class Reply:
    """An SMTP reply; ``text`` is one line or a tuple of lines (a multi-line reply).

    ``enhanced`` is the RFC 3463 status code written at the start of every line ("5.1.1"), or
    None (no code, or, in a received reply, not the same code on every line: those lines are
    kept as received, with whatever code they carry).

    Its own __init__ (see mxspool.envelope): one is built per accepted message ("queued as").
    """

    code: int
    enhanced: str | None
    text: str | tuple[str, ...]
    _wire: bytes = field(init=False, repr=False, compare=False)
    _line: str = field(init=False, repr=False, compare=False)

    def __init__(self, code: int, enhanced: str | None, text: str | tuple[str, ...]) -> None:
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "enhanced", enhanced)
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "_wire", b"")
        object.__setattr__(self, "_line", "")
        # Reply text may come from configuration or policy code; a CR or LF in it would let that
        # text inject extra reply lines, so it is refused at construction.
        lines = self.lines
        if not 200 <= self.code <= 599 or not lines:
            raise ValueError(f"invalid SMTP reply: {self.code} {self.text!r}")
        for line in lines:
            if "\r" in line or "\n" in line:
                raise ValueError(f"CR or LF in SMTP reply text: {line!r}")

    @classmethod
    def parse(cls, code: int, lines: Sequence[str]) -> Reply:
        """A reply as received: ``lines`` are its lines without the "ddd-"/"ddd " prefix.

        An enhanced code that starts every line becomes ``enhanced`` (so ``to_bytes`` gives the
        reply back as it was sent); any line-breaking character inside a line becomes a space.
        Raises ValueError when ``code`` is not an SMTP reply code (200-599).
        """
        return _parse(code, tuple(lines))

    @property
    def lines(self) -> tuple[str, ...]:
        return (self.text,) if isinstance(self.text, str) else self.text

    @property
    def positive(self) -> bool:
        """2xx: the command was accepted and completed (a 354 to DATA is not: it asks for more)."""
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        """5xx: retrying the same command cannot succeed."""
        return 500 <= self.code < 600

    @property
    def enhanced_status(self) -> str | None:
        """The RFC 3463 status code: ``enhanced``, or the one that starts the first line of a
        received reply whose lines do not all carry it (the classification needs it either way)."""
        if self.enhanced is not None:
            return self.enhanced
        match = _ENHANCED.match(self.lines[0])
        return match.group() if match else None

    @property
    def message(self) -> str:
        """The reply on one line, without the code: every line with its enhanced code, joined
        by spaces ("5.1.1 The email account 5.1.1 does not exist")."""
        head = self.enhanced
        if head is None:
            return " ".join(self.lines)
        return " ".join(f"{head} {line}" if line else head for line in self.lines)

    def to_bytes(self) -> bytes:
        wire = self._wire
        if not wire:
            # Most replies the server sends are module constants sent millions of times: each
            # is encoded once, on first use (a received reply is seldom encoded at all).
            wire = self._encode()
            object.__setattr__(self, "_wire", wire)
        return wire

    def _encode(self) -> bytes:
        lines = self.lines
        last = len(lines) - 1
        head = f"{self.enhanced} " if self.enhanced else ""
        out = [
            f"{self.code}{' ' if i == last else '-'}{head}{line}\r\n"
            for i, line in enumerate(lines)
        ]
        return "".join(out).encode("utf-8")

    def __str__(self) -> str:
        # One line, so log lines and the ledger's CSV rows stay one line each. Kept, as the
        # wire form is: the mail log writes the same few replies for every message.
        line = self._line
        if not line:
            line = f"{self.code} {self.message}".rstrip()
            object.__setattr__(self, "_line", line)
        return line


@functools.lru_cache(maxsize=256)
def _parse(code: int, lines: tuple[str, ...]) -> Reply:
    # Cached: a hop answers most commands with the same few replies ("250 2.1.5 Ok"), and the
    # client parses one reply per command in a release, where delivery is CPU-bound.
    if len(lines) == 1 and lines[0].isprintable():  # the usual reply: one line, no controls
        line = lines[0]
        match = _ENHANCED.match(line)
        if match is not None:
            end = match.end()
            if end == len(line) or line[end] == " ":
                return Reply(code, match.group(), line[end + 1 :])
        return Reply(code, None, line)
    clean = [" ".join(line.splitlines()) for line in lines] or [""]
    first = _ENHANCED.match(clean[0])
    enhanced = first.group() if first else None
    if enhanced is not None and all(
        line == enhanced or line.startswith(enhanced + " ") for line in clean
    ):
        clean = [line[len(enhanced) + 1 :] for line in clean]
    else:
        enhanced = None
    return Reply(code, enhanced, clean[0] if len(clean) == 1 else tuple(clean))


def queued(queue_id: str) -> Reply:
    """The final answer to DATA, sent only after the message is durably committed."""
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


@functools.lru_cache(maxsize=16)
def greeting(hostname: str) -> Reply:
    return Reply(220, None, f"{hostname} ESMTP mxspool")


def timeout(hostname: str) -> Reply:
    return Reply(421, "4.4.2", f"{hostname} Error: timeout exceeded, closing connection")


def too_many_errors(hostname: str) -> Reply:
    """Sent when a session reaches ServerConfig.hard_error_limit (Postfix's exact text)."""
    return Reply(421, "4.7.0", f"{hostname} Error: too many errors")


def internal_error(hostname: str) -> Reply:
    """Sent when a connection cannot be set up for a fault of ours (4.3.0: a mail system
    failure, RFC 3463): the client closes and retries later."""
    return Reply(421, "4.3.0", f"{hostname} Error: internal error, try again later")


# -- replies named by the interface contract (exact texts) ----------------------------------
RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied")
RECIPIENT_UNKNOWN = Reply(550, "5.1.1", "Recipient unknown")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message too big")
STORAGE_ERROR = Reply(451, "4.3.0", "Temporary storage error")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient storage")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections")
MAIL_LOOP = Reply(554, "5.4.6", "Mail loop detected")
BARE_NEWLINE = Reply(500, "5.5.2", "Bare CR or LF not allowed")

# -- positive replies ----------------------------------------------------------------------
OK = Reply(250, "2.0.0", "Ok")
MAIL_OK = Reply(250, "2.1.0", "Ok")
RCPT_OK = Reply(250, "2.1.5", "Ok")
QUEUED = Reply(250, "2.0.0", "Ok: queued")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
BYE = Reply(221, "2.0.0", "Bye")
CANNOT_VRFY = Reply(252, "2.1.5", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(214, "2.0.0", "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS")

# -- protocol errors -------------------------------------------------------------------------
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
# RFC 5321 4.5.3.1.6 limits a text line to 1000 octets; RFC 5321 suggests "500 Line too long"
# for that too, so the same reply serves command lines and message lines.
DATA_LINE_TOO_LONG = LINE_TOO_LONG
NUL_NOT_ALLOWED = Reply(500, "5.5.2", "NUL character not allowed")
EMPTY_COMMAND = Reply(500, "5.5.2", "Syntax error: empty command")
UNRECOGNIZED = Reply(500, "5.5.1", "Command unrecognized")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
EXPN_DISABLED = Reply(502, "5.5.1", "EXPN not available")
AUTH_NOT_OFFERED = Reply(502, "5.5.1", "AUTH not available")
STARTTLS_NOT_OFFERED = Reply(502, "5.5.1", "STARTTLS not available")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "TLS already active")
NEED_HELO = Reply(503, "5.5.1", "Send HELO/EHLO first")
HELO_CONTROL_CHARACTER = Reply(
    501, "5.5.4", "Invalid HELO/EHLO hostname: control characters not allowed"
)
NESTED_MAIL = Reply(503, "5.5.1", "Nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
TRANSACTION_IN_PROGRESS = Reply(503, "5.5.1", "MAIL transaction in progress")
# RFC 3207 4: STARTTLS is an EHLO extension, so it is refused until EHLO has advertised it.
STARTTLS_NEEDS_EHLO = Reply(503, "5.5.1", "Send EHLO first")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
NULL_RECIPIENT = Reply(501, "5.1.3", "Null recipient not allowed")
# RFC 6531 3.7.4.1: a non-ASCII address without SMTPUTF8 on MAIL gets 553 5.6.7.
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
BAD_UTF8 = Reply(501, "5.5.4", "Invalid UTF-8 in command")
ESMTP_PARAMS_AFTER_HELO = Reply(555, "5.5.4", "ESMTP parameters not allowed after HELO")


# Client text echoed in a reply is cut to this many characters: a reply line stays far below
# the 512-octet limit (RFC 5321 4.5.3.1.5) whatever the client sent.
ECHO_MAX = 64


def echo(text: str, limit: int = ECHO_MAX) -> str:
    """Client text made safe to quote in a reply: printable US-ASCII only (anything else,
    controls and non-ASCII alike, becomes "?"), at most ``limit`` characters, then "..."."""
    safe = "".join(c if " " <= c <= "~" else "?" for c in text[:limit])
    return safe + "..." if len(text) > limit else safe


def syntax(usage: str) -> Reply:
    return Reply(501, "5.5.4", f"Syntax: {usage}")


def bad_parameter(what: str) -> Reply:
    return Reply(501, "5.5.4", f"Bad parameter: {echo(what)}")


def unprintable_parameter(keyword: str) -> Reply:
    """RFC 3461 4.2, 4.4: the decoded ORCPT and ENVID values must be printable US-ASCII; a
    control character there would become a line of its own in a DSN."""
    return Reply(
        501,
        "5.5.4",
        f"Bad {echo(keyword)} parameter: the decoded value must be printable US-ASCII "
        "(no control characters)",
    )


def duplicate_parameter(keyword: str) -> Reply:
    return Reply(501, "5.5.4", f"Duplicate parameter: {echo(keyword)}")


def unsupported_parameter(keyword: str) -> Reply:
    return Reply(555, "5.5.4", f"Unsupported parameter: {echo(keyword)}")


class CommandError(Exception):
    """Raised by the command parsers; carries the reply the server sends for it."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply
