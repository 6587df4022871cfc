"""Envelope values shared by the SMTP core, the store and delivery.

These are plain frozen values: the SMTP core builds them from MAIL/RCPT parameters, the store
keeps them, delivery replays them to the next hop (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531
SMTPUTF8, RFC 3461 DSN).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mxspool import addresses


@dataclass(frozen=True, slots=True)
class MailParams:
    """ESMTP parameters of MAIL FROM that matter downstream."""

    size: int | None = None
    body: str | None = None  # "7BIT" or "8BITMIME", as declared by the client
    smtputf8: bool = False
    ret: str | None = None  # DSN RET: "FULL" or "HDRS"
    envid: str | None = None  # DSN ENVID, still xtext-encoded as received


@dataclass(frozen=True, slots=True)
class RcptParams:
    """ESMTP parameters of RCPT TO that matter downstream (RFC 3461)."""

    notify: tuple[str, ...] | None = None  # e.g. ("SUCCESS", "FAILURE") or ("NEVER",)
    orcpt: str | None = None  # "rfc822;user@example.com", xtext-encoded as received


@dataclass(frozen=True, slots=True)
class Recipient:
    address: str
    params: RcptParams = field(default_factory=RcptParams)


@dataclass(frozen=True, slots=True)
class Envelope:
    """The reverse-path ("" for the null sender <>) and the accepted recipients."""

    mail_from: str
    mail_params: MailParams
    recipients: tuple[Recipient, ...]


def domain_of(address: str) -> str:
    """The domain of a mailbox address in comparison form (``mxspool.addresses``): its A-label,
    ASCII-lowercased."""
    return addresses.domain_of(address)
