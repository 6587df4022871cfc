"""``queue bounce ID``: an RFC 3464 delivery status notification to the reverse-path.

Bounces are never automatic (docs/design.md): this runs only when an operator asks. The DSN is a
``multipart/report; report-type=delivery-status`` with a human part, a ``message/delivery-status``
part (one block per recipient not delivered, its Diagnostic-Code the next hop's last reply),
and the original headers (``text/rfc822-headers``; never the body). It is sent with
``MAIL FROM:<>`` so it can never cause another bounce, and never to the null reverse-path.
Recipients whose sender asked for no failure notice (RFC 3461 ``NOTIFY=NEVER``, or a NOTIFY
list without FAILURE) are left out.

No backscatter, no reaching inside. Unless the operator forces it (``--force``), the DSN is
withheld when the reverse-path is an address literal (``user@[127.0.0.1]``), when the sender's
SPF result at arrival was ``fail`` (the ``spf=fail`` tag that ``intake.auth`` records: the
sender is most likely forged), and when the sender's domain resolves only to addresses that are
not global unicast (loopback, private, link-local, reserved...). That last check is made on the
very addresses the connection goes to (``PublicOnly``), so a domain re-pointed at 127.0.0.1
between two lookups (DNS rebinding) is caught too. A sender in one of our own domains goes by
the configured route, which the operator chose, and is not checked. A withheld DSN still ends
the recipients ``bounced`` (the operator asked to give up on them), with the reason in their
last reply, the message tagged ``dsn=withheld``, and the reason in the result; ``queue bounce
--force`` later sends the withheld DSN.
"""

from __future__ import annotations

import email.utils
import ipaddress
import re
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from mxspool.config import Config
from mxspool.delivery.dnscache import DnsCache
from mxspool.delivery.errors import ConnectFailed
from mxspool.delivery.identity import outbound_identity
from mxspool.delivery.routing import Hop, Router
from mxspool.delivery.smtpclient import SmtpConnector
from mxspool.delivery.transport import Connector, Session, Transaction, open_any
from mxspool.envelope import MailParams, Recipient, domain_of
from mxspool.smtp.replies import Reply
from mxspool.store.base import RecipientRecord, RecipientState, Store, StoredMessage, TlsMode

HEADER_LIMIT = 64 * 1024
_OPEN = (RecipientState.PENDING, RecipientState.DELIVERING, RecipientState.PARKED)
_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
SPF_FAIL_TAG = "spf=fail"
"""Recorded at arrival by ``mxspool.intake.auth`` (with the verdict, just after the commit)."""
WITHHELD_TAG = "dsn=withheld"
SENT_TAG = "dsn=sent"


class BounceError(Exception):
    """The DSN cannot be built or sent; the message says why and what to do."""


class DsnWithheld(BounceError):
    """The DSN must not go to this destination unless forced; the message says why."""


@dataclass(frozen=True, slots=True)
class BounceResult:
    recipient: str
    """The DSN's recipient: the original reverse-path."""
    reply: Reply | None
    """The accepting server's reply; None when the DSN was withheld."""
    reported: int
    """Recipients listed in the DSN (or that it would have listed)."""
    withheld: str = ""
    """Why the DSN was not sent ("" when it was)."""
    forced: bool = False

    @property
    def sent(self) -> bool:
        return self.reply is not None


def public_address(text: str) -> bool:
    """Whether ``text`` is an IP address a DSN may connect to: global unicast only."""
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False  # not an address: nothing to check it against, so no
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if embedded is not None and not public_address(str(embedded)):
            return False
    return address.is_global and not address.is_multicast


class PublicOnly:
    """A ``Connector`` that opens sessions only to public addresses (``public_address``).

    The check is on ``Hop.address``, the resolved address the wrapped connector connects to.
    """

    def __init__(self, inner: Connector) -> None:
        self.inner = inner

    async def open(self, hop: Hop, tls: TlsMode) -> Session:
        if not public_address(hop.address):
            raise ConnectFailed(f"{hop}: not a public address; no DSN is sent there")
        return await self.inner.open(hop, tls)


def withhold_reason(message: StoredMessage) -> str:
    """Why the DSN for ``message`` must not be sent without --force ("" when it may be), from
    what the message says; the destination's addresses are checked when sending."""
    domain = domain_of(message.mail_from)
    if domain.startswith("["):
        return (
            f"the sender <{message.mail_from}> is an address literal: a DSN would go to "
            "whatever address the client wrote"
        )
    if SPF_FAIL_TAG in message.tags:
        return "SPF fail at arrival: the sender address is most likely forged (backscatter)"
    return ""


def _literal_hop(domain: str, port: int = 25) -> Hop | None:
    """The hop of an address-literal domain ("[192.0.2.1]", "[IPv6:2001:db8::1]")."""
    if not domain.startswith("["):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        address = str(ipaddress.ip_address(inner))
    except ValueError:
        raise BounceError(f"the sender's address literal {domain} is not an IP address") from None
    return Hop(address, address, port)


def notified(recipient: RecipientRecord) -> bool:
    """Whether the sender wants a failure notice for this recipient (RFC 3461 NOTIFY)."""
    notify = recipient.params.notify
    return notify is None or "FAILURE" in (item.upper() for item in notify)


def _xtext_decode(value: str) -> str:
    """Decode RFC 3461 xtext for a DSN field; any decoded character that is not printable
    US-ASCII stays "+XX"-encoded, so no stored value can add a line to the DSN (the SMTP
    core already refuses such ENVID/ORCPT values; this covers older spools)."""

    def one(m: re.Match[str]) -> str:
        if m.group(1) is None:  # a raw control character: encode it
            return f"+{ord(m.group()):02X}" if ord(m.group()) < 0x100 else "?"
        code = int(m.group(1), 16)
        return chr(code) if 0x20 <= code <= 0x7E else m.group().upper()

    return re.sub(r"\+([0-9A-Fa-f]{2})|[\x00-\x1f\x7f-\x9f\u2028\u2029]", one, value)


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
    states: Sequence[RecipientState] = _OPEN,
) -> bytes:
    """The DSN for every recipient of ``message`` not yet delivered, discarded or bounced
    (in ``states``: a withheld DSN sent later reports the bounced ones).

    Raises BounceError when the reverse-path is null or nobody is left to report on.
    """
    if not message.mail_from:
        raise BounceError(
            f"message {message.id} has a null reverse-path (MAIL FROM:<>); a DSN cannot be "
            "sent to it. Use 'mxspool queue discard' or 'queue retry' instead"
        )
    failed = [r for r in message.recipients if r.state in states and notified(r)]
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
    public_only: bool = True,
) -> Reply:
    """Deliver ``dsn`` with ``MAIL FROM:<>`` to ``recipient``: by the configured route when
    the recipient's domain is one of ours, else by the MX of its domain (TLS opportunistic).

    With ``public_only``, a domain not ours gets the DSN only at public addresses; raises
    DsnWithheld when it has none.
    """
    if not recipient:
        raise BounceError("a DSN is never sent to the null reverse-path")
    name = domain_of(recipient)
    literal = _literal_hop(name)
    domain = None if literal else await store.get_domain(name)
    if domain is not None:
        hops, tls = await router.hops(domain), domain.tls
    else:
        hops = [literal] if literal else await router.mx_hops(name)
        tls = TlsMode.OPPORTUNISTIC
        if public_only:
            public = [hop for hop in hops if public_address(hop.address)]
            if not public:
                found = ", ".join(dict.fromkeys(hop.address for hop in hops))
                raise DsnWithheld(
                    f"the sender's domain {name} resolves only to addresses that are not "
                    f"public ({found}): a DSN there would reach a loopback, private or "
                    "reserved network"
                )
            hops, connector = public, PublicOnly(connector)
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
    force: bool = False,
    router: Router | None = None,
    connector: Connector | None = None,
) -> BounceResult:
    """``queue bounce ID``: build, send, then mark the recipients bounced (in that order, so a
    failed send leaves the message as it was).

    A DSN that must not be sent (see the module docstring) is withheld unless ``force``: the
    recipients are still marked bounced, and the result says why. With ``force``, a message
    whose DSN was withheld earlier gets it now.
    """
    message = await store.get_message(message_id)
    if message is None:
        raise BounceError(f"no message {message_id}; 'mxspool queue list' shows the queue")
    resend = force and WITHHELD_TAG in message.tags and SENT_TAG not in message.tags
    states = (RecipientState.BOUNCED,) if resend else _OPEN
    headers = await read_original_headers(store, message_id)
    dsn = build_dsn(message, headers, config.smtp.hostname, states=states)
    reported = sum(1 for r in message.recipients if r.state in states and notified(r))
    reason = "" if force else withhold_reason(message)
    reply: Reply | None = None
    if not reason:
        identity = outbound_identity(config.delivery)
        router = router or Router(DnsCache(config.delivery.resolver), identity)
        connector = connector or SmtpConnector(
            local_hostname=config.smtp.hostname,
            connect_timeout=config.delivery.connect_timeout,
            ca_file=config.delivery.ca_file,
            identity=identity,
        )
        try:
            reply = await send_dsn(
                dsn,
                message.mail_from,
                store=store,
                router=router,
                connector=connector,
                public_only=not force,
            )
        except DsnWithheld as exc:
            reason = str(exc)
        except BounceError:
            raise
        except Exception as exc:
            raise BounceError(
                f"the DSN for {message_id} could not be sent to <{message.mail_from}>: {exc}; "
                "the message is unchanged"
            ) from exc
    if reply is None:
        await store.mark_bounced(message_id, f"bounced by operator; no DSN sent: {reason}")
        await store.add_tag(message_id, WITHHELD_TAG)
        return BounceResult(message.mail_from, None, reported, withheld=reason)
    if not resend:
        await store.mark_bounced(message_id, f"bounced by operator; DSN accepted: {reply}")
    await store.add_tag(message_id, SENT_TAG)
    return BounceResult(message.mail_from, reply, reported, forced=force)
