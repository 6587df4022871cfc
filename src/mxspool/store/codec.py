"""Row and JSON forms of messages, recipients, envelope parameters and routes, shared by the
SQL stores."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from mxspool.addresses import ascii_lower
from mxspool.envelope import MailParams, RcptParams, Recipient, domain_of
from mxspool.store.base import (
    DestinationDeferral,
    Domain,
    DomainMode,
    IncomingMessage,
    Route,
    TlsMode,
)

MESSAGE_COLUMNS = (
    "id",
    "received_at",
    "mail_from",
    "mail_params",
    "size",
    "sha256",
    "message_id",
    "client_address",
    "client_name",
    "helo",
    "tls_version",
    "tls_cipher",
    "tags",
)


def message_row(message: IncomingMessage, *, digest: bool = True) -> dict[str, Any]:
    """The messages row of ``message``, by column, in MESSAGE_COLUMNS order; without
    ``digest``, its "sha256" is None (the caller's SQL computes it from the body: the SQLite
    commit thread, ``mxspool_sha256``)."""
    envelope = message.envelope
    client = message.client
    return {
        "id": message.id,
        "received_at": message.received_at,
        "mail_from": envelope.mail_from,
        "mail_params": dump_mail_params(envelope.mail_params),
        "size": message.body.size,
        "sha256": message.body.sha256 if digest else None,
        "message_id": message.message_id,
        "client_address": client.address,
        "client_name": client.hostname,
        "helo": client.helo,
        "tls_version": client.tls_version,
        "tls_cipher": client.tls_cipher,
        "tags": dump_tags(message.tags),
    }


def merge_tags(stored: str, new: Sequence[str]) -> str:
    """The stored (comma-separated) tags with ``new`` added, each replacing an earlier tag of
    the same name (the part before ``=``)."""
    names = {tag.partition("=")[0] for tag in new}
    kept = [tag for tag in stored.split(",") if tag and tag.partition("=")[0] not in names]
    return ",".join([*kept, *new])


DOMAIN_COLUMNS = (
    "name, mode, routes, use_mx, tls, rate, profile, created_at, released_at, max_size, "
    "subdomains, plus_separator"
)
"""The columns ``domain_from_row`` reads, in its order (also what writers RETURN)."""


def domain_row(domain: Domain, now: float) -> tuple[Any, ...]:
    """The domains row of a new ``domain``: DOMAIN_COLUMNS, then updated_at."""
    return (
        ascii_lower(domain.name),
        domain.mode.value,
        dump_routes(domain.routes),
        domain.use_mx,
        domain.tls.value,
        domain.rate,
        domain.profile,
        domain.created_at or now,
        domain.released_at,
        domain.max_size,
        domain.subdomains,
        domain.plus_separator,
        now,
    )


def domain_from_row(row: Sequence[Any]) -> Domain:
    (name, mode, routes, use_mx, tls, rate, profile, created_at, released_at, max_size) = row[:10]
    subdomains, plus_separator = row[10:12]
    return Domain(
        name=name,
        mode=DomainMode(mode),
        routes=load_routes(routes),
        use_mx=bool(use_mx),
        tls=TlsMode(tls),
        rate=rate,
        profile=profile,
        created_at=created_at,
        released_at=released_at,
        max_size=max_size,
        subdomains=bool(subdomains),
        plus_separator=plus_separator,
    )


def recipient_row(recipient: Recipient, domain: str | None = None) -> tuple[str, str, str]:
    """(address, its domain, parameters as JSON), as the recipients table has them.

    ``domain`` is the configured domain the intake accepted it under (a subdomain's parent);
    None: the address's own domain in comparison form.
    """
    address = recipient.address
    return address, domain or domain_of(address), dump_rcpt_params(recipient.params)


def accept_recipients(message: IncomingMessage) -> list[tuple[str, ...]]:
    """The recipient rows of an accepted message: (address, domain, params), with the state
    and last reply appended for those stored parked at once (``IncomingMessage.parked``)."""
    domains = message.domains
    parked = message.parked
    rows: list[tuple[str, ...]] = []
    for index, recipient in enumerate(message.envelope.recipients):
        row: tuple[str, ...] = recipient_row(
            recipient, domains[index] if index < len(domains) else None
        )
        reason = parked.get(index) if parked else None
        if reason is not None:
            row = (*row, "parked", reason)
        rows.append(row)
    return rows


_COMPACT = json.JSONEncoder(separators=(",", ":"))


def _compact_json(data: dict[str, Any]) -> str:
    # Most envelopes have no parameters; json.dumps with separators builds a new encoder per
    # call: about 4% of the event loop's samples per accepted message in a profile.
    return _COMPACT.encode(data) if data else "{}"


def dump_mail_params(params: MailParams) -> str:
    data: dict[str, Any] = {
        key: value
        for key, value in (
            ("size", params.size),
            ("body", params.body),
            ("smtputf8", params.smtputf8 or None),
            ("ret", params.ret),
            ("envid", params.envid),
        )
        if value is not None
    }
    return _compact_json(data)


def load_mail_params(text: str) -> MailParams:
    data = json.loads(text)
    return MailParams(
        size=data.get("size"),
        body=data.get("body"),
        smtputf8=bool(data.get("smtputf8", False)),
        ret=data.get("ret"),
        envid=data.get("envid"),
    )


def dump_rcpt_params(params: RcptParams) -> str:
    data: dict[str, Any] = {}
    if params.notify is not None:
        data["notify"] = list(params.notify)
    if params.orcpt is not None:
        data["orcpt"] = params.orcpt
    return _compact_json(data)


def load_rcpt_params(text: str) -> RcptParams:
    data = json.loads(text)
    notify = data.get("notify")
    return RcptParams(notify=tuple(notify) if notify is not None else None, orcpt=data.get("orcpt"))


def deferral_params(domain: str, deferral: DestinationDeferral) -> dict[str, Any]:
    """The named parameters of the UPDATE that defers a dead destination's queue."""
    expire = deferral.expire_received_before
    return {
        "domain": ascii_lower(domain),
        "until": deferral.until,
        "reply": deferral.reply,
        "now": deferral.now,
        "cutoff": expire if expire is not None else -1.0,
        "expired": deferral.expired_reply,
    }


def dump_tags(tags: Sequence[str]) -> str:
    """Tags as the messages table keeps them: comma-separated (a tag has no comma)."""
    return ",".join(tags)


def load_tags(text: str) -> tuple[str, ...]:
    return tuple(tag for tag in text.split(",") if tag)


def dump_routes(routes: tuple[Route, ...]) -> str:
    return json.dumps([[route.host, route.port] for route in routes])


def load_routes(text: str) -> tuple[Route, ...]:
    return tuple(Route(host, int(port)) for host, port in json.loads(text))
