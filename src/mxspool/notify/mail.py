"""An email target: the event as a short plain-text message through the operator's relay.

It goes out through mxspool's one SMTP client (``delivery.smtpclient``), as DSNs do
(``delivery.bounce``): one session to ``relay`` per notification, STARTTLS per ``tls``, no
SMTP AUTH (the relay accepts this node by its address, as relays for servers usually do).
The subject names the event and the domain; the body has the same facts as the webhook JSON.

A 5xx reply is final (the relay refuses this sender or these recipients); connection failures,
timeouts and 4xx replies may be retried. With several ``to``, success means at least one
was accepted (the refusals are in the result text).
"""

from __future__ import annotations

import asyncio
import email.utils
from collections.abc import AsyncIterator
from email.message import EmailMessage
from email.policy import SMTP

from mxspool.config import Config, NotifyTarget, split_host_port
from mxspool.delivery.errors import DeliveryError
from mxspool.delivery.routing import Hop
from mxspool.delivery.smtpclient import SmtpConnector
from mxspool.delivery.transport import Transaction
from mxspool.envelope import MailParams, Recipient
from mxspool.notify.events import Event
from mxspool.notify.targets import RetryPolicy, SendFailed, policy_of, wanted
from mxspool.store.base import TlsMode


def render(event: Event, sender: str, to: list[str]) -> bytes:
    """The message: RFC 5322, CRLF line ends, marked as automatic (RFC 3834)."""
    message = EmailMessage(policy=SMTP)
    message["From"] = sender
    message["To"] = ", ".join(to)
    message["Subject"] = event.subject()
    message["Date"] = email.utils.formatdate(event.at, usegmt=True)
    message["Message-ID"] = email.utils.make_msgid("notify", sender.rpartition("@")[2] or None)
    message["Auto-Submitted"] = "auto-generated"
    message["X-Mxspool-Event"] = event.event
    message["X-Mxspool-Event-Id"] = event.id
    message.set_content(event.text())
    return message.as_bytes()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


class EmailTarget:
    kind = "email"

    def __init__(self, entry: NotifyTarget, config: Config, backlog_threshold: int) -> None:
        self.entry = entry
        self.name = entry.name or entry.to[0]
        self.policy: RetryPolicy = policy_of(entry)
        self.backlog_threshold = backlog_threshold
        self.sender = entry.sender or f"mxspool@{config.smtp.hostname}"
        host, port = split_host_port(entry.relay, 25)
        self.hop = Hop(host, host, port)
        self.connector = SmtpConnector(
            local_hostname=config.smtp.hostname,
            connect_timeout=entry.timeout,
            ca_file=config.delivery.ca_file,
            command_timeout=entry.timeout,
            final_timeout=entry.timeout,
        )

    def wants(self, event: Event) -> bool:
        return wanted(self.entry, event, self.backlog_threshold)

    async def attempt(self, event: Event) -> str:
        data = render(event, self.sender, self.entry.to)
        params = MailParams(size=len(data), body=None if data.isascii() else "8BITMIME")
        recipients = tuple(Recipient(address) for address in self.entry.to)
        tx = Transaction(self.sender, params, recipients, len(data), lambda: _once(data))
        try:
            async with asyncio.timeout(self.entry.timeout * 3):
                session = await self.connector.open(self.hop, TlsMode(self.entry.tls))
                try:
                    replies = await session.send(tx)
                finally:
                    await session.close()
        except TimeoutError:
            raise SendFailed(f"relay {self.hop} did not finish in time", retry=True) from None
        except DeliveryError as exc:
            raise SendFailed(f"relay {self.hop}: {exc}", retry=True) from None
        accepted = [to for to, reply in zip(self.entry.to, replies, strict=True) if reply.positive]
        if accepted:
            refused = [
                f"<{to}> {reply}"
                for to, reply in zip(self.entry.to, replies, strict=True)
                if not reply.positive
            ]
            extra = f" (refused: {'; '.join(refused)})" if refused else ""
            return f"accepted by {self.hop} for {', '.join(accepted)}{extra}"
        worst = replies[0]
        raise SendFailed(f"relay {self.hop} refused it: {worst}", retry=worst.code < 500)

    async def close(self) -> None:
        return None
