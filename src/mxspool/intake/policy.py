"""Relay policy and the recipient gate: which recipients mxspool accepts, and how big a message
each may take.

mxspool is never an open relay. A recipient is accepted only when its domain is configured
(or is a subdomain of a domain configured with ``--subdomains``), and only in the plain
``local@domain`` form: every address form that some MTA somewhere interprets as "relay onward"
is refused outright, because the next hop might honour it even though we do not. Domains
compare by A-label with ASCII-only case folding (``mxspool.addresses``): a U-label from an
SMTPUTF8 client matches its A-label, and a name IDNA 2008 refuses (U+212A KELVIN SIGN for a
``k``) matches nothing.

The gate answers as Exchange Online would, so that what we accept the target takes, and what
it would refuse is refused while the sender is still connected (a refusal in the session costs
nothing; accepting and bouncing later sends backscatter to forged senders):

- a domain with a recipient list (``mxspool recipients import``) refuses every address not on
  it with ``550 5.1.1``; local parts compare case-insensitively;
- plus addressing: ``local+tag@domain`` is accepted when ``local@domain`` is (on by default in
  Exchange Online); the separator is per domain, "" turns it off
  (``DisablePlusAddressInRecipients``). The address is kept as written: the target delivers it
  by its own plus logic;
- ``postmaster@`` every accepted domain is always accepted, and so is ``<Postmaster>`` without
  a domain (RFC 5321 4.5.1), stored as ``postmaster@`` the domain ``DomainTable.postmaster_domain``
  names;
- sizes: a domain's limit (``--max-size``, else its profile's default, never above ``[smtp]
  max_message_size``) and a mailbox's MaxReceiveSize from the recipient list. With SIZE= on
  MAIL, a recipient whose limit is smaller gets ``552 5.2.3`` at RCPT; the SMTP core refuses a
  SIZE= above every domain's limit (``session_max_size``) with ``552 5.3.4``.

A reverse-path with an address literal (``MAIL FROM:<user@[192.0.2.1]>``) is refused unless
``[smtp] allow_sender_literals``: legitimate mail comes from domain names, and a DSN to a
literal would connect wherever the client wrote (``127.0.0.1``, an internal host).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mxspool.addresses import domain_key, local_key
from mxspool.config import SmtpConfig
from mxspool.delivery.exchange import default_max_size
from mxspool.intake.domains import DomainTable
from mxspool.smtp.replies import RECIPIENT_UNKNOWN, RELAY_DENIED, Reply
from mxspool.store.base import Domain

SENDER_LITERAL_REFUSED = Reply(
    550, "5.7.1", "Address literals are not accepted in MAIL FROM; use a domain name"
)
NO_POSTMASTER_DOMAIN = Reply(
    550, "5.7.1", "No domain is configured here, so <Postmaster> mail has nowhere to go"
)


def recipient_too_big(limit: int) -> Reply:
    """``552 5.2.3``: the declared SIZE is more than this recipient's mailbox takes."""
    return Reply(552, "5.2.3", f"Message too big for this recipient (its limit is {limit} bytes)")


class RecipientPath(Protocol):
    @property
    def address(self) -> str: ...

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


@dataclass(frozen=True, slots=True, init=False)
class Accepted:
    """A recipient the gate lets in (its own __init__: see mxspool.envelope)."""

    address: str
    """The envelope address to store: as written, except ``<Postmaster>`` (given its domain)."""
    domain: str
    """The configured domain it is accepted under (routed and held like it)."""
    max_size: int
    """The largest message (bytes) this recipient takes."""

    def __init__(self, address: str, domain: str, max_size: int) -> None:
        object.__setattr__(self, "address", address)
        object.__setattr__(self, "domain", domain)
        object.__setattr__(self, "max_size", max_size)


def sender_refusal(path: RecipientPath, config: SmtpConfig) -> Reply | None:
    """The 550 reply when the reverse-path ``path`` must not be accepted, or None when it may.

    The null reverse-path ``<>`` (bounces) is always accepted.
    """
    if path.address_literal and not config.allow_sender_literals:
        return SENDER_LITERAL_REFUSED
    return None


def domain_max_size(domain: Domain, global_max: int) -> int:
    """The largest message the domain's target takes: ``--max-size``, else the profile's
    default, capped by ``[smtp] max_message_size``."""
    limit = domain.max_size if domain.max_size is not None else default_max_size(domain.profile)
    return global_max if limit is None else min(limit, global_max)


def session_max_size(table: DomainTable, global_max: int) -> int:
    """The size advertised in EHLO and enforced for SIZE= and DATA: the largest any configured
    domain takes (a message above it fits no recipient)."""
    if not table.domains:
        return global_max
    return max(domain_max_size(domain, global_max) for domain in table.domains.values())


def relay_refusal(path: RecipientPath, table: DomainTable) -> Reply | None:
    """The 550 reply when ``path`` must not be accepted, or None when it may."""
    if path.domain is None:
        return None if _is_postmaster(path) else RELAY_DENIED
    if path.source_route or path.address_literal:
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
    if table.find(path.domain) is None:
        return RELAY_DENIED
    return None


def check_recipient(
    path: RecipientPath,
    table: DomainTable,
    *,
    hostname: str,
    global_max: int,
    declared_size: int | None,
) -> Accepted | Reply:
    """The whole RCPT decision: the refusal to send, or how the recipient is accepted."""
    refusal = relay_refusal(path, table)
    if refusal is not None:
        return refusal
    if path.domain is None:  # <Postmaster>
        domain = table.postmaster_domain(hostname)
        if domain is None:
            return NO_POSTMASTER_DOMAIN
        return Accepted(
            f"postmaster@{domain.name}", domain.name, domain_max_size(domain, global_max)
        )
    domain = table.find(path.domain)
    assert domain is not None  # relay_refusal checked it
    limit = domain_max_size(domain, global_max)
    local = local_key(path.local_part[1:-1] if path.quoted_local else path.local_part)
    if local != "postmaster":
        listed = table.recipients.get(domain.name)
        key = _listed_key(local, domain_key(path.domain) or "", domain, listed)
        if listed is not None and key is None:
            return RECIPIENT_UNKNOWN
        mailbox = table.max_sizes.get(key) if key is not None else None
        if mailbox is not None:
            limit = min(limit, mailbox)
    if declared_size is not None and declared_size > limit:
        return recipient_too_big(limit)
    return Accepted(path.address, domain.name, limit)


def _listed_key(
    local: str, domain: str, config: Domain, listed: frozenset[str] | None
) -> str | None:
    """The recipient-list entry this recipient matches (itself, else its address without the
    plus tag); with no list, the address itself (it may still have a MaxReceiveSize)."""
    address = f"{local}@{domain}"
    if listed is None or address in listed:
        return address
    separator = config.plus_separator
    if separator and separator in local:
        base = local.split(separator, 1)[0]
        if base and f"{base}@{domain}" in listed:
            return f"{base}@{domain}"
    return None


def _is_postmaster(path: RecipientPath) -> bool:
    return path.domain is None and local_key(path.local_part) == "postmaster"


def too_big_at_end(accepted: list[Accepted], size: int) -> dict[int, str] | None:
    """At the end of DATA: the recipients (by index) whose limit ``size`` exceeds, with the
    reason they are parked at once; None when it exceeds every one (refuse: ``552 5.3.4``)."""
    over = {
        index: (
            f"552 5.2.3 not attempted: the message ({size} bytes) is larger than this "
            f"recipient takes ({item.max_size} bytes); parked at arrival"
        )
        for index, item in enumerate(accepted)
        if size > item.max_size
    }
    if accepted and len(over) == len(accepted):
        return None
    return over
