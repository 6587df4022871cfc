"""``queue bounce ID``: an RFC 3464 delivery status notification to the reverse-path.

Bounces are never automatic (DESIGN.md): this runs only when an operator asks. The DSN is a
``multipart/report; report-type=delivery-status`` with a human part, a ``message/delivery-status``
part (one block per recipient not delivered, its Diagnostic-Code the next hop's last reply),
and the original headers (``text/rfc822-headers``; never the body). It is sent with
``MAIL FROM:<>`` so it can never cause another bounce, and never to the null reverse-path.
Recipients whose sender asked for no failure notice (RFC 3461 ``NOTIFY=NEVER``, or a NOTIFY
list without FAILURE) are left out.
"""

from __future__ import annotations

import email.utils
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from mxspool.config import Config
from mxspool.delivery.dnscache import DnsCache
from mxspool.delivery.reply import Reply
from mxspool.delivery.routing import Router
from mxspool.delivery.transport import AiosmtplibConnector, Connector, Transaction, open_any
from mxspool.envelope import MailParams, Recipient, domain_of
from mxspool.store.base import RecipientRecord, RecipientState, Store, StoredMessage, TlsMode

HEADER_LIMIT = 64 * 1024
_OPEN = (RecipientState.PENDING, RecipientState.DELIVERING, RecipientState.PARKED)
_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")


class BounceError(Exception):
    """The DSN cannot be built or sent; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class BounceResult:
    recipient: str
    """Where the DSN went: the original reverse-path."""
    reply: Reply
    """The accepting server's reply."""
    reported: int
    """Recipients listed in the DSN."""


def notified(recipient: RecipientRecord) -> bool:
    """Whether the sender wants a failure notice for this recipient (RFC 3461 NOTIFY)."""
    notify = recipient.params.notify
    return notify is None or "FAILURE" in (item.upper() for item in notify)


def _xtext_decode(value: str) -> str:
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


def _status(reply: str | None) -> str:
    if reply:
        match = _ENHANCED.search(reply)
        if match:
            return ".".join(match.groups())
        if reply[:1] == "4":
            return "4.0.0"
    return "5.0.0"


def _address_type(address: str) -> str:
    return "rfc822" if address.isascii() else "utf-8"  # RFC 6533 for internationalized ones


def build_dsn(
    message: StoredMessage,
    original_headers: bytes,
    reporting_mta: str,
    *,
    now: float | None = None,
) -> bytes:
    """The DSN for every recipient of ``message`` not yet delivered, discarded or bounced.

    Raises BounceError when the reverse-path is null or nobody is left to report on.
    """
    if not message.mail_from:
        raise BounceError(
            f"message {message.id} has a null reverse-path (MAIL FROM:<>); a DSN cannot be "
            "sent to it. Use 'mxspool queue discard' or 'queue retry' instead"
        )
    failed = [r for r in message.recipients if r.state in _OPEN and notified(r)]
    if not failed:
        raise BounceError(
            f"message {message.id} has no undelivered recipient whose sender wants a failure "
            "notice (all are final, or NOTIFY excludes FAILURE)"
        )
    when = email.utils.formatdate(now if now is not None else time.time())
    boundary = f"{message.id}.{secrets.token_hex(8)}/{reporting_mta}"
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{message.mail_from}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {when}",
        f"Message-ID: <{message.id}.{secrets.token_hex(6)}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to the recipients below; the operator of this",
        "system returned it to you. The original headers are attached.",
        "",
    ]
    lines += [f"<{r.address}>: {r.last_reply or 'not delivered'}" for r in failed]
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {reporting_mta}",
    ]
    if message.mail_params.envid:
        lines.append(f"Original-Envelope-Id: {_xtext_decode(message.mail_params.envid)}")
    lines.append(f"Arrival-Date: {email.utils.formatdate(message.received_at)}")
    for recipient in failed:
        lines += ["", f"Final-Recipient: {_address_type(recipient.address)}; {recipient.address}"]
        if recipient.params.orcpt:
            kind, _, original = _xtext_decode(recipient.params.orcpt).partition(";")
            lines.append(f"Original-Recipient: {kind.strip()}; {original.strip()}")
        lines += ["Action: failed", f"Status: {_status(recipient.last_reply)}"]
        if recipient.last_reply:
            lines.append(f"Diagnostic-Code: smtp; {' '.join(recipient.last_reply.split())}")
        if recipient.attempts:
            lines.append(f"Last-Attempt-Date: {email.utils.formatdate(recipient.updated_at)}")
    lines += ["", f"--{boundary}", "Content-Type: text/rfc822-headers", ""]
    head = "\r\n".join(lines).encode() + b"\r\n"
    headers = original_headers.rstrip(b"\r\n") + b"\r\n"
    return head + headers + f"\r\n--{boundary}--\r\n".encode()


async def read_original_headers(store: Store, message_id: str, limit: int = HEADER_LIMIT) -> bytes:
    """The header section of the stored message (up to ``limit`` bytes), without the body."""
    data = b""
    async for piece in store.read_body(message_id):
        data += piece
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            return data[: end + 2]
        if len(data) >= limit:
            break
    return data[:limit]


async def send_dsn(
    dsn: bytes,
    recipient: str,
    *,
    store: Store,
    router: Router,
    connector: Connector,
) -> Reply:
    """Deliver ``dsn`` with ``MAIL FROM:<>`` to ``recipient``: by the configured route when
    the recipient's domain is one of ours, else by the MX of its domain (TLS opportunistic)."""
    if not recipient:
        raise BounceError("a DSN is never sent to the null reverse-path")
    name = domain_of(recipient)
    domain = await store.get_domain(name)
    if domain is not None:
        hops, tls = await router.hops(domain), domain.tls
    else:
        hops, tls = await router.mx_hops(name), TlsMode.OPPORTUNISTIC
    params = MailParams(
        size=len(dsn),
        body=None if dsn.isascii() else "8BITMIME",
        smtputf8=not recipient.isascii(),
    )
    tx = Transaction("", params, (Recipient(recipient),), len(dsn), lambda: _once(dsn))
    session = await open_any(connector, hops, tls)
    try:
        (reply,) = await session.send(tx)
    finally:
        await session.close()
    if not reply.positive:
        raise BounceError(f"{session.hop} refused the DSN for <{recipient}>: {reply}")
    return reply


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def bounce_message(
    config: Config,
    store: Store,
    message_id: str,
    *,
    router: Router | None = None,
    connector: Connector | None = None,
) -> BounceResult:
    """``queue bounce ID``: build, send, then mark the recipients bounced (in that order, so a
    failed send leaves the message as it was)."""
    message = await store.get_message(message_id)
    if message is None:
        raise BounceError(f"no message {message_id}; 'mxspool queue list' shows the queue")
    headers = await read_original_headers(store, message_id)
    dsn = build_dsn(message, headers, config.smtp.hostname)
    router = router or Router(DnsCache(config.delivery.resolver))
    connector = connector or AiosmtplibConnector(
        local_hostname=config.smtp.hostname,
        connect_timeout=config.delivery.connect_timeout,
        ca_file=config.delivery.ca_file,
    )
    try:
        reply = await send_dsn(
            dsn, message.mail_from, store=store, router=router, connector=connector
        )
    except BounceError:
        raise
    except Exception as exc:
        raise BounceError(
            f"the DSN for {message_id} could not be sent to <{message.mail_from}>: {exc}; "
            "the message is unchanged"
        ) from exc
    reported = sum(1 for r in message.recipients if r.state in _OPEN and notified(r))
    await store.mark_bounced(message_id, f"bounced by operator; DSN accepted: {reply}")
    return BounceResult(message.mail_from, reply, reported)
