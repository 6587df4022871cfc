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

# Each event has an __init__ of its own, or object's (init=False): see mxspool.envelope.


class Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"  # feed more bytes with receive_data()
    PAUSED = "PAUSED"  # a decision event awaits respond()/accept()


NEED_DATA = Sentinel.NEED_DATA
PAUSED = Sentinel.PAUSED


@dataclass(frozen=True, slots=True, init=False)
class Hello:
    """EHLO (``extended``) or HELO; already answered by the core."""

    name: str
    extended: bool

    def __init__(self, name: str, extended: bool) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "extended", extended)


@dataclass(frozen=True, slots=True, init=False)
class MailFrom:
    """Decision. accept() answers 250 2.1.0; a 2xx starts the transaction."""

    path: Path
    params: MailParams

    def __init__(self, path: Path, params: MailParams) -> None:
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "params", params)


@dataclass(frozen=True, slots=True, init=False)
class RcptTo:
    """Decision. accept() answers 250 2.1.5; a 2xx adds the recipient."""

    path: Path
    params: RcptParams

    def __init__(self, path: Path, params: RcptParams) -> None:
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "params", params)


@dataclass(frozen=True, slots=True, init=False)
class DataStart:
    """Decision. accept() answers 354 and the core starts reading content."""


@dataclass(frozen=True, slots=True, init=False)
class DataChunk:
    """Message content (unstuffed), in order; no answer."""

    data: bytes

    def __init__(self, data: bytes) -> None:
        object.__setattr__(self, "data", data)


@dataclass(frozen=True, slots=True, init=False)
class MessageComplete:
    """Decision: the content ended cleanly. Answer queued(id) after the durable commit, or
    451/452; either way the transaction is over."""

    size: int
    received_count: int
    message_id: str | None
    header: bytes  # header section, through the CRLF of its last field
    header_too_long: bool

    def __init__(
        self,
        size: int,
        received_count: int,
        message_id: str | None,
        header: bytes = b"",
        header_too_long: bool = False,
    ) -> None:
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "received_count", received_count)
        object.__setattr__(self, "message_id", message_id)
        object.__setattr__(self, "header", header)
        object.__setattr__(self, "header_too_long", header_too_long)


@dataclass(frozen=True, slots=True, init=False)
class MessageRejected:
    """The content ended but the core refused it and already sent ``reply``; the application
    discards what it spooled. The transaction is over."""

    reply: Reply

    def __init__(self, reply: Reply) -> None:
        object.__setattr__(self, "reply", reply)


@dataclass(frozen=True, slots=True, init=False)
class StartTLS:
    """Decision. accept() answers 220; then write data_to_send() and start TLS."""


@dataclass(frozen=True, slots=True, init=False)
class Reset:
    """RSET, or EHLO/HELO during a transaction: drop the transaction."""


@dataclass(frozen=True, slots=True, init=False)
class Quit:
    """QUIT was answered with 221; close the connection after writing data_to_send()."""


@dataclass(frozen=True, slots=True, init=False)
class ProtocolError:
    """The core refused a command with ``reply`` (already sent); for logging."""

    reply: Reply
    command: bytes  # the start of the offending line

    def __init__(self, reply: Reply, command: bytes = b"") -> None:
        object.__setattr__(self, "reply", reply)
        object.__setattr__(self, "command", command)


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
