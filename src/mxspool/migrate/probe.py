"""The flow probe: a marked test message through the spooler's own SMTP listener.

``mxspool probe DOMAIN`` submits a small message to the first ``[smtp] listen`` address, like
any sender on the internet would, reads the queue id from the ``250`` reply, finds the message
in the store and tags it ``probe``; in relay mode it then waits (bounded) for the delivery and
reports the target's reply.

Why tag afterwards, from the store, rather than let the intake recognise a header: whoever
can write to the store is already trusted, while a header is something any sender can forge.
So the ``X-Mxspool-Probe`` header and subject carry a random token only to help a person find
the message in the target mailbox; they grant nothing. Probes use the null reverse-path
(``MAIL FROM:<>``), so a probe that fails can never cause a bounce.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid

from mxspool.config import Config, split_host_port
from mxspool.delivery.errors import DeliveryError
from mxspool.delivery.routing import Hop
from mxspool.delivery.smtpclient import SmtpConnector
from mxspool.delivery.transport import Transaction
from mxspool.envelope import MailParams, Recipient
from mxspool.store.base import TlsMode

PROBE_TAG = "probe"
HEADER = "X-Mxspool-Probe"


class ProbeError(Exception):
    """The probe could not be submitted; the message says what happened and what to do."""


@dataclass(frozen=True, slots=True)
class Submitted:
    queue_id: str
    token: str
    reply: str
    listener: str


def listener_address(config: Config) -> tuple[str, int]:
    """Where to submit: the first listen address, a wildcard replaced by loopback."""
    host, port = split_host_port(config.smtp.listen[0])
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, port


def probe_message(domain: str, rcpt: str, token: str, hostname: str) -> bytes:
    now = datetime.now(UTC)
    lines = [
        f"From: mxspool probe <mxspool-probe@{hostname}>",
        f"To: <{rcpt}>",
        f"Subject: mxspool probe {token}",
        f"Date: {format_datetime(now)}",
        f"Message-ID: {make_msgid('probe', domain=hostname)}",
        f"{HEADER}: {token}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"A test message sent by 'mxspool probe {domain}' at {now.isoformat(timespec='seconds')}",
        "to check that mail for the domain flows through the spooler to its destination.",
        "It can be deleted.",
        "",
    ]
    return "\r\n".join(lines).encode("ascii")


SUBMIT_TIMEOUT = 30.0


async def submit(config: Config, domain: str, rcpt: str) -> Submitted:
    """Send the probe to our own listener; the queue id from its 250 reply.

    STARTTLS when offered, without checking the certificate (it is for the public name, not
    for loopback).
    """
    host, port = listener_address(config)
    where = f"{host}:{port}"
    token = secrets.token_hex(8)
    data = probe_message(domain, rcpt, token, config.smtp.hostname)
    client = SmtpConnector(
        local_hostname=config.smtp.hostname,
        connect_timeout=SUBMIT_TIMEOUT,
        command_timeout=SUBMIT_TIMEOUT,
        final_timeout=SUBMIT_TIMEOUT,
    )
    try:
        session = await client.open(Hop(host, host, port), TlsMode.OPPORTUNISTIC)
    except DeliveryError as exc:
        raise ProbeError(
            f"cannot submit the probe to {where} ({exc}); is 'mxspool serve' running with "
            "this configuration?"
        ) from None
    try:
        mail = await session.command(b"MAIL", b"FROM:<>")
        if not mail.positive:
            raise ProbeError(f"the spooler at {where} refused the probe: {mail}")
        accepted = await session.command(b"RCPT", b"TO:<" + rcpt.encode() + b">")
        if not accepted.positive:
            raise ProbeError(
                f"the spooler refused the recipient <{rcpt}>: {accepted}; "
                "check that the domain is configured and the address is on its recipient list "
                "('mxspool recipients list'), or give another with --to"
            )
        start = await session.command(b"DATA")
        if start.code != 354:
            raise ProbeError(f"the spooler at {where} refused the probe: {start}")
        tx = Transaction("", MailParams(), (Recipient(rcpt),), len(data), lambda: _once(data))
        reply = await session.content(tx)
        if not reply.positive:
            raise ProbeError(f"the spooler at {where} refused the probe: {reply}")
    except DeliveryError as exc:
        raise ProbeError(
            f"the probe's session with {where} broke ({exc}); see the spooler's log"
        ) from None
    finally:
        await session.close()
    marker = "queued as "
    text = reply.message
    if marker not in text:
        raise ProbeError(f"the spooler's reply has no queue id: {text!r}")
    queue_id = text.split(marker, 1)[1].split()[0].strip("<>")
    return Submitted(queue_id, token, str(reply), where)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
