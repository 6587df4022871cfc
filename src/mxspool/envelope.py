"""Envelope values shared by the SMTP core, the store and delivery.

These are plain frozen values: the SMTP core builds them from MAIL/RCPT parameters, the store
keeps them, delivery replays them to the next hop (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531
SMTPUTF8, RFC 3461 DSN).
"""

from __future__ import annotations

from dataclasses import dataclass

from mxspool import addresses

# Frozen dataclasses with an __init__ of their own (init=False): mypyc compiles it to native
# attribute stores (~25 ns), where the dataclass-generated frozen __init__ stays interpreted
# Python calling object.__setattr__ per field (~340 ns); the SMTP core and the listener build
# several of these per message on the event loop (~5% of its time). eq, hash, repr, fields()
# and replace() are still the dataclass's.


@dataclass(frozen=True, slots=True, init=False)
class MailParams:
    """ESMTP parameters of MAIL FROM that matter downstream."""

    size: int | None
    body: str | None  # "7BIT" or "8BITMIME", as declared by the client
    smtputf8: bool
    ret: str | None  # DSN RET: "FULL" or "HDRS"
    envid: str | None  # DSN ENVID, still xtext-encoded as received

    def __init__(
        self,
        size: int | None = None,
        body: str | None = None,
        smtputf8: bool = False,
        ret: str | None = None,
        envid: str | None = None,
    ) -> None:
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "body", body)
        object.__setattr__(self, "smtputf8", smtputf8)
        object.__setattr__(self, "ret", ret)
        object.__setattr__(self, "envid", envid)


@dataclass(frozen=True, slots=True, init=False)
class RcptParams:
    """ESMTP parameters of RCPT TO that matter downstream (RFC 3461)."""

    notify: tuple[str, ...] | None  # e.g. ("SUCCESS", "FAILURE") or ("NEVER",)
    orcpt: str | None  # "rfc822;user@example.com", xtext-encoded as received

    def __init__(self, notify: tuple[str, ...] | None = None, orcpt: str | None = None) -> None:
        object.__setattr__(self, "notify", notify)
        object.__setattr__(self, "orcpt", orcpt)


NO_RCPT_PARAMS = RcptParams()
"""A recipient's parameters when RCPT TO gave none (frozen, so one value serves all)."""


@dataclass(frozen=True, slots=True, init=False)
class Recipient:
    address: str
    params: RcptParams

    def __init__(self, address: str, params: RcptParams = NO_RCPT_PARAMS) -> None:
        object.__setattr__(self, "address", address)
        object.__setattr__(self, "params", params)


@dataclass(frozen=True, slots=True, init=False)
class Envelope:
    """The reverse-path ("" for the null sender <>) and the accepted recipients."""

    mail_from: str
    mail_params: MailParams
    recipients: tuple[Recipient, ...]

    def __init__(
        self, mail_from: str, mail_params: MailParams, recipients: tuple[Recipient, ...]
    ) -> None:
        object.__setattr__(self, "mail_from", mail_from)
        object.__setattr__(self, "mail_params", mail_params)
        object.__setattr__(self, "recipients", recipients)


def domain_of(address: str) -> str:
    """The domain of a mailbox address in comparison form (``mxspool.addresses``): its A-label,
    ASCII-lowercased."""
    return addresses.domain_of(address)
