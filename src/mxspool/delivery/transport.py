"""Outbound SMTP: the small interface delivery code sees.

The scheduler and ``queue bounce`` only see ``Connector.open(hop, tls) -> Session`` and
``Session.send(tx)``, which returns one final reply per recipient. SMTP replies are results,
not exceptions; anything that breaks the session (connection, TLS, timeout) is mapped, at the
edge, to the exceptions in ``delivery.errors`` (httpcore style). The implementation is our own
client, ``smtpclient.SmtpConnector``; the tests wrap it (``bounce.PublicOnly``) or replace it.

This module also says what a ``Transaction`` puts on the wire (MAIL and RCPT arguments, the
extensions a message needs) and builds the TLS contexts of the route modes, so that any
implementation sends the same envelope. DATA is streamed from the store in pieces with our own
dot-stuffing (see ``dotstuff``) and write back-pressure, so neither a large message nor a slow
hop grows memory.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from mxspool.delivery.errors import ConnectFailed, TlsFailed, Unsupported
from mxspool.delivery.routing import Hop
from mxspool.envelope import MailParams, Recipient
from mxspool.smtp.replies import Reply
from mxspool.store.base import TlsMode

COMMAND_TIMEOUT = 300.0  # RFC 5321 section 4.5.3.2: MAIL and RCPT 5 minutes
FINAL_REPLY_TIMEOUT = 600.0  # ... and 10 minutes for the reply to the final dot


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
    """MAIL FROM's arguments: the stored envelope's parameters the hop offers."""
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
