"""Release planning: what a release will send, per recipient, and how long it will take.

Exchange Online accepts at most 3,600 messages an hour per recipient ("Recipient rate limit",
Exchange Online limits, Microsoft Learn), so a mailbox with 10,000 held messages takes about
three hours however fast the release is paced, and the operator cannot see that from the
domain's totals. ``plan_release`` reads, for each domain, one GROUP BY over its pending rows
(``Store.recipient_backlog``) and gives, per recipient: the messages and bytes waiting, the
messages larger than its mailbox takes (the recipient list's MaxReceiveSize, or the domain's
``max_size``), whether a recipient hold keeps them, its readiness as far as known, and its
ETA under the per-recipient limit (the drain's own pacing, ``exchange.RecipientPacer``, for
domains of the exchange-online profile). The slowest mailboxes come first.

The overall ETA is the maximum of the per-recipient ETAs and the global-rate ETA (every
message at the release's rate), not a sum: mailboxes drain in parallel, and the rate bounds
them all together. With ``shared`` the domains share one rate (a migration's domains of one
target tenant); without it each domain has its own.

Readiness is the domain's last ``check recipients`` run as the store keeps it
(``Store.recipient_checks``): ready / not ready / unknown, the target's reply, and when. A
recipient that run did not probe (it arrived later, or no run yet) is "unknown"; a result older
than ``STALE_AFTER`` is still shown, marked stale (mailboxes get created; check again).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mxspool.config import Config
from mxspool.delivery import exchange
from mxspool.store.base import Domain, NotFound, RecipientCheck, Store
from mxspool.units import parse_rate

UNKNOWN = "unknown"
STALE_AFTER = 24 * 3600.0
"""Seconds after which a ``check recipients`` result is shown as stale."""


@dataclass(frozen=True, slots=True)
class RecipientPlan:
    address: str
    messages: int
    size: int
    too_big: int
    """Messages larger than the mailbox (MaxReceiveSize) or the domain takes: they will park."""
    held: int
    """Messages a recipient hold keeps back (``hold --recipient``): not part of the release."""
    max_size: int | None
    readiness: str
    eta_s: float
    """Seconds until its last message can go under the per-recipient limit (0: at once)."""
    readiness_reply: str = ""
    """The target's reply at RCPT in that check (or why there was no verdict)."""
    checked_at: float | None = None
    """When ``check recipients`` found ``readiness``; None: never checked."""
    stale: bool = False
    """The check is older than ``STALE_AFTER``."""


@dataclass(frozen=True, slots=True)
class DomainPlan:
    domain: str
    mode: str
    profile: str | None
    rate: float
    """Messages per second of the release; 0: unpaced."""
    per_recipient_hourly_limit: int | None
    """None: the domain's target has no per-recipient limit (not exchange-online)."""
    recipients: tuple[RecipientPlan, ...]
    """Slowest first."""

    @property
    def messages(self) -> int:
        return sum(item.messages - item.held for item in self.recipients)

    @property
    def size(self) -> int:
        return sum(item.size for item in self.recipients)

    @property
    def too_big(self) -> int:
        return sum(item.too_big for item in self.recipients)

    @property
    def held(self) -> int:
        return sum(item.held for item in self.recipients)

    @property
    def rate_eta_s(self) -> float:
        return self.messages / self.rate if self.rate > 0 else 0.0

    @property
    def recipient_eta_s(self) -> float:
        return max((item.eta_s for item in self.recipients), default=0.0)

    @property
    def eta_s(self) -> float:
        return max(self.rate_eta_s, self.recipient_eta_s)


@dataclass(frozen=True, slots=True)
class ReleasePlan:
    domains: tuple[DomainPlan, ...]
    shared: bool
    """One rate for all the domains together (a migration's target tenant)."""
    at: float

    @property
    def messages(self) -> int:
        return sum(item.messages for item in self.domains)

    @property
    def eta_s(self) -> float:
        """The overall ETA: the slowest domain, or the shared rate over all the messages."""
        slowest = max((item.eta_s for item in self.domains), default=0.0)
        if self.shared and self.domains and self.domains[0].rate > 0:
            return max(slowest, self.messages / self.domains[0].rate)
        return slowest


def _rate(domain: Domain, rate: str | None, config: Config) -> float:
    if rate is not None:
        return parse_rate(rate)
    return domain.rate if domain.rate is not None else config.delivery.rate


async def plan_release(
    store: Store,
    config: Config,
    domains: Sequence[str],
    *,
    rate: str | None = None,
    shared: bool = False,
    readiness: Mapping[str, RecipientCheck] | None = None,
    now: float | None = None,
) -> ReleasePlan:
    """The release plan of ``domains`` (names; NotFound for an unknown one) at ``rate``
    (e.g. "600/min"; None: each domain's own, else ``[delivery] rate``); ValueError for a
    rate that does not parse. ``readiness``: lowercased address -> its check (None: each
    domain's last ``check recipients`` run from the store). Reads only; changes nothing."""
    at = time.time() if now is None else now
    plans = []
    for name in domains:
        domain = await store.get_domain(name.lower())
        if domain is None:
            raise NotFound(f"no domain {name}; 'mxspool domain list' shows the domains")
        limit = domain.max_size
        if limit is None:
            limit = exchange.default_max_size(domain.profile)
        per_hour = (
            (config.delivery.per_recipient_hourly_limit or exchange.RECIPIENT_PER_HOUR)
            if exchange.applies(domain.profile)
            else None
        )
        checks = readiness
        if checks is None:
            checks = {item.address: item for item in await store.recipient_checks(domain.name)}
        recipients = []
        for row in await store.recipient_backlog(domain.name, limit):
            going = row.messages - row.held
            eta = (
                exchange.recipient_drain_seconds(going, per_hour, row.busiest_pair)
                if per_hour
                else 0.0
            )
            check = checks.get(row.address)
            recipients.append(
                RecipientPlan(
                    row.address,
                    row.messages,
                    row.size,
                    row.too_big,
                    row.held,
                    row.max_size,
                    check.state if check else UNKNOWN,
                    eta,
                    check.reply if check else "",
                    check.checked_at if check else None,
                    check is not None and at - check.checked_at > STALE_AFTER,
                )
            )
        recipients.sort(key=lambda item: (-item.eta_s, -item.messages, item.address))
        plans.append(
            DomainPlan(
                domain.name,
                domain.mode.value,
                domain.profile,
                _rate(domain, rate, config),
                per_hour,
                tuple(recipients),
            )
        )
    return ReleasePlan(tuple(plans), shared, at)


def _iso(value: float) -> str:
    return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def check_age(item: RecipientPlan, now: float) -> float | None:
    """Seconds since the recipient's readiness was checked; None: never."""
    return None if item.checked_at is None else max(0.0, now - item.checked_at)


def _recipient_dict(item: RecipientPlan, now: float) -> dict[str, Any]:
    age = check_age(item, now)
    return {
        "address": item.address,
        "messages": item.messages,
        "size": item.size,
        "too_big": item.too_big,
        "held_by_recipient_hold": item.held,
        "max_size": item.max_size,
        "readiness": item.readiness,
        "readiness_reply": item.readiness_reply,
        "checked_at": None if item.checked_at is None else _iso(item.checked_at),
        "check_age_s": None if age is None else round(age, 1),
        "readiness_stale": item.stale,
        "eta_s": round(item.eta_s, 1),
    }


def plan_to_dict(plan: ReleasePlan) -> dict[str, Any]:
    """The ``--json`` shape (docs/interface.md)."""
    return {
        "at": plan.at,
        "shared_rate": plan.shared,
        "messages": plan.messages,
        "eta_s": round(plan.eta_s, 1),
        "domains": [
            {
                "domain": item.domain,
                "mode": item.mode,
                "profile": item.profile,
                "rate_per_s": item.rate,
                "per_recipient_hourly_limit": item.per_recipient_hourly_limit,
                "messages": item.messages,
                "size": item.size,
                "too_big": item.too_big,
                "held_by_recipient_hold": item.held,
                "rate_eta_s": round(item.rate_eta_s, 1),
                "recipient_eta_s": round(item.recipient_eta_s, 1),
                "eta_s": round(item.eta_s, 1),
                "recipients": [_recipient_dict(row, plan.at) for row in item.recipients],
            }
            for item in plan.domains
        ],
    }
