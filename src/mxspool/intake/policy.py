"""Relay policy: which recipients mxspool accepts.

mxspool is never an open relay. A recipient is accepted only when its domain is configured,
compared exactly and case-insensitively, and only in the plain ``local@domain`` form: every
address form that some MTA somewhere interprets as "relay onward" is refused outright, because
the next hop might honour it even though we do not.

A domain with a recipient list (``mxspool recipients import``) also refuses, at RCPT, every
address not on it with ``550 5.1.1``: refusing in the session costs nothing, while accepting and
bouncing later would send backscatter to forged senders. The comparison is case-insensitive on
the whole address, local part included, as Exchange Online treats addresses.

A reverse-path with an address literal (``MAIL FROM:<user@[192.0.2.1]>``) is refused unless
``[smtp] allow_sender_literals``: legitimate mail comes from domain names, and a DSN to a
literal would connect wherever the client wrote (``127.0.0.1``, an internal host).
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Protocol

from mxspool.config import SmtpConfig
from mxspool.smtp.replies import RECIPIENT_UNKNOWN, RELAY_DENIED, Reply

SENDER_LITERAL_REFUSED = Reply(
    550, "5.7.1", "Address literals are not accepted in MAIL FROM; use a domain name"
)


class RecipientPath(Protocol):
    @property
    def local_part(self) -> str: ...

    @property
    def domain(self) -> str | None: ...

    @property
    def source_route(self) -> bool: ...

    @property
    def quoted_local(self) -> bool: ...

    @property
    def address_literal(self) -> bool: ...


def sender_refusal(path: RecipientPath, config: SmtpConfig) -> Reply | None:
    """The 550 reply when the reverse-path ``path`` must not be accepted, or None when it may.

    The null reverse-path ``<>`` (bounces) is always accepted.
    """
    if path.address_literal and not config.allow_sender_literals:
        return SENDER_LITERAL_REFUSED
    return None


def relay_refusal(path: RecipientPath, domains: Container[str]) -> Reply | None:
    """The 550 reply when ``path`` must not be accepted, or None when it may."""
    if path.source_route or path.address_literal or path.domain is None:
        return RELAY_DENIED
    local = path.local_part
    if path.quoted_local:
        local = local[1:-1]
    # The percent hack (user%other@us), bang paths (other!user@us) and quoted local parts
    # that carry routing characters are all ways to ask the next hop to relay further.
    if any(char in local for char in '%!@:,;<>[]\\"'):
        return RELAY_DENIED
    if path.domain.endswith("."):
        # "user@example.com." is the same domain to DNS; we accept only the plain form.
        return RELAY_DENIED
    if path.domain.lower() not in domains:
        return RELAY_DENIED
    return None


def unknown_recipient(path: RecipientPath, lists: Mapping[str, frozenset[str]]) -> Reply | None:
    """``550 5.1.1`` when the recipient's domain has a list without it; call after relay_refusal."""
    if path.domain is None:
        return None
    domain = path.domain.lower()
    allowed = lists.get(domain)
    if allowed is None:
        return None
    local = path.local_part[1:-1] if path.quoted_local else path.local_part
    if f"{local.lower()}@{domain}" in allowed:
        return None
    return RECIPIENT_UNKNOWN
