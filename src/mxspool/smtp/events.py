"""Events the SMTP core hands to the application.

*Decision* events (:data:`DECISION_EVENTS`) need an answer: after one is returned,
``next_event()`` returns ``PAUSED`` until the application calls ``respond()`` or ``accept()``.
All other events are information; the core has already sent whatever reply they imply.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeAlias

from mxspool.envelope import MailParams, RcptParams
from mxspool.smtp.address import Path
from mxspool.smtp.replies import Reply


class Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"  # feed more bytes with receive_data()
    PAUSED = "PAUSED"  # a decision event awaits respond()/accept()


NEED_DATA = Sentinel.NEED_DATA
PAUSED = Sentinel.PAUSED


@dataclass(frozen=True, slots=True)
class Hello:
    """EHLO (``extended``) or HELO; already answered by the core."""

    name: str
    extended: bool


@dataclass(frozen=True, slots=True)
class MailFrom:
    """Decision. accept() answers 250 2.1.0; a 2xx starts the transaction."""

    path: Path
    params: MailParams


@dataclass(frozen=True, slots=True)
class RcptTo:
    """Decision. accept() answers 250 2.1.5; a 2xx adds the recipient."""

    path: Path
    params: RcptParams


@dataclass(frozen=True, slots=True)
class DataStart:
    """Decision. accept() answers 354 and the core starts reading content."""


@dataclass(frozen=True, slots=True)
class DataChunk:
    """Message content (unstuffed), in order; no answer."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MessageComplete:
    """Decision: the content ended cleanly. Answer queued(id) after the durable commit, or
    451/452; either way the transaction is over."""

    size: int
    received_count: int
    message_id: str | None
    header: bytes = b""  # header section, through the CRLF of its last field
    header_too_long: bool = False


@dataclass(frozen=True, slots=True)
class MessageRejected:
    """The content ended but the core refused it and already sent ``reply``; the application
    discards what it spooled. The transaction is over."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Decision. accept() answers 220; then write data_to_send() and start TLS."""


@dataclass(frozen=True, slots=True)
class Reset:
    """RSET, or EHLO/HELO during a transaction: drop the transaction."""


@dataclass(frozen=True, slots=True)
class Quit:
    """QUIT was answered with 221; close the connection after writing data_to_send()."""


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The core refused a command with ``reply`` (already sent); for logging."""

    reply: Reply
    command: bytes = b""  # the start of the offending line


Event: TypeAlias = (
    Hello
    | MailFrom
    | RcptTo
    | DataStart
    | DataChunk
    | MessageComplete
    | MessageRejected
    | StartTLS
    | Reset
    | Quit
    | ProtocolError
)

DECISION_EVENTS = (MailFrom, RcptTo, DataStart, MessageComplete, StartTLS)
