"""The Exchange Online pacing profile (``domain add/route --profile exchange-online``).

What Exchange Online does, and how a drain to it reacts:

- At most 200 recipients per message: the engine splits every message at 200 anyway.
- At most 3,600 messages an hour per recipient and 1,200 per sender and recipient pair
  (beyond that it answers 5.2.121 / 5.2.122). ``RecipientPacer`` keeps one GCRA bucket per
  recipient and per pair, in memory on each node, sized so that no sliding hour ever holds
  more than the limit. A recipient over its budget is not attempted: it is deferred, not
  counted as an attempt, to the time its bucket has room (reserved, so a backlog of a hot
  mailbox spreads out at the allowed pace instead of coming back all at once).
  Why in memory and not through ``Store.take_tokens``: that would be two store writes per
  recipient per message, doubling the store's work in a release, where the store is the
  bottleneck. With several nodes a recipient could get up to (nodes x limit) an hour, but
  Exchange Online's own answer to that (5.2.121/5.2.122, "AS" throttling) only defers mail
  here, never loses or parks it; the buckets are a courtesy that keeps us below the limit.
- 451 4.7.500-4.7.699 (the "AS" throttling codes, ``is_throttling``): the recipient is
  deferred as usual, and the destination's rate follows ``backoff.AdaptiveRate``: AIMD on the
  share of such replies per second (halved while more than half are busy, then a tenth of
  the configured rate back per calm second), so a target that is busy as a whole slows the
  release to the floor, while sparse busy replies leave the rate alone. The busy recipient
  itself is retried sooner than ``retry_schedule`` would: ``busy_delay``.
- 5.2.121 / 5.2.122 (rate limits sent as 5xx): deferred per ``retry_schedule``, never parked.
- 550 5.4.1 (recipient unknown to the tenant, "DBEB") on a domain that was released: during a
  migration that means "the mailbox is not created at the target yet". The row stays pending,
  re-checked every ``NOT_READY_EVERY`` (15 minutes), with a last reply starting "not ready at
  target", so ``queue list`` and the report show why; it is parked (with that reason) once
  ``NOT_READY_FOR`` (24 hours) have passed since the release, counted like ``max_age``. The
  existing states suffice: "pending with a reason and a next attempt" is exactly a deferral.
  Outside a release (a domain that was never held) it is a plain 5xx: parked.
- 451 4.4.62 (the message reached the wrong region or tenant): retrying cannot help until an
  operator fixes the route, so the recipient is parked with an explanation saying so.
"""

from __future__ import annotations

from dataclasses import dataclass

from mxspool.config import AddressFamily
from mxspool.delivery import outcomes
from mxspool.delivery.outcomes import AttemptContext
from mxspool.smtp.replies import Reply
from mxspool.store.base import ClaimedRecipient, RecipientOutcome, RecipientState
from mxspool.units import format_duration

PROFILE = "exchange-online"

RECIPIENT_PER_HOUR = 3600
PAIR_PER_HOUR = 1200
BURST_SHARE = 60
"""Burst allowance: one sixtieth of the hourly limit (a minute's worth) may go at once."""
NOT_READY_EVERY = 15 * 60.0
NOT_READY_FOR = 24 * 3600.0
BUSY_RETRY = 0.25
"""Seconds before a recipient deferred by a busy reply is tried again (``busy_delay``)."""
BUSY_QUICK_TRIES = 3
"""Attempts after which the wait after a busy reply starts doubling (``busy_delay``)."""


MAX_MESSAGE_SIZE = 150 * 1024 * 1024
"""Exchange Online's largest message: 150 MB (Exchange's MB: 1,048,576 bytes), the most an
organization or a mailbox's MaxReceiveSize can be set to ("Exchange Online limits", Microsoft
Learn). A mailbox's default MaxReceiveSize is 36 MB, but a tenant may raise it up to this, so
only this is certain to be refused by the target; per-mailbox limits come from the recipient
list's MaxReceiveSize column."""


def applies(profile: str | None) -> bool:
    return profile == PROFILE


def default_max_size(profile: str | None) -> int | None:
    """The largest message a domain with this profile takes when it has no ``--max-size``."""
    return MAX_MESSAGE_SIZE if applies(profile) else None


def address_family(configured: AddressFamily, *, by_certificate: bool) -> AddressFamily | None:
    """The IP version delivery to an exchange-online domain may use; None: none is allowed.

    The runbook's inbound connector recognises the spooler by ``-SenderIPAddresses`` (and
    Enhanced Filtering skips it by ``-EFSkipIPs``), and its ``--spooler-ip`` is the spooler's
    public IPv4 address: Exchange Online connectors take no IPv6 addresses there
    (https://learn.microsoft.com/powershell/module/exchange/new-inboundconnector). Mail that
    arrived over IPv6 would match no connector, so the profile narrows the configured family
    to IPv4; it never widens it (``address_family = "ipv6"`` leaves no family: deferred, with
    the reason). With a TLS client certificate (``by_certificate``) the connector recognises
    the spooler by its certificate instead, whatever the address, and the configured family
    applies unchanged.
    """
    if by_certificate or configured == "ipv4":
        return configured
    return "ipv4" if configured == "any" else None


def is_throttling(reply: Reply) -> bool:
    """451 4.7.500-4.7.699: Exchange Online's "AS" throttling of a sending server."""
    status = reply.enhanced_status
    if reply.code != 451 or status is None or not status.startswith("4.7."):
        return False
    return 500 <= int(status.split(".")[2]) <= 699


def busy_delay(ctx: AttemptContext, attempts_before: int) -> float:
    """How long a recipient deferred by a busy reply waits: ``BUSY_RETRY`` after each of its
    first ``BUSY_QUICK_TRIES`` attempts, then doubling at each attempt, never longer than its
    ``retry_schedule`` step.

    Why not the schedule's step itself: the busy reply is about the sending server's pace,
    not about this recipient, and the pace already follows busy replies (``AdaptiveRate``).
    Exchange Online gives a few such replies to any sender at any pace, and each try of a
    recipient is as likely to meet one as the last. With the schedule's first step of a
    minute, each such reply held its recipient back a minute, and the release's last
    messages were the few that were busy several times in a row, minutes after the rest.
    Retried a quarter of a second later, a lone busy reply costs about that. The doubling
    keeps a recipient that stays busy from coming back quickly for long: after about ten busy
    tries (a minute) its waits are the schedule's. A retry waits for the destination's rate
    like any other transaction, so sooner retries never send faster than the rate in force.
    """
    doublings = min(max(attempts_before + 1 - BUSY_QUICK_TRIES, 0), 32)
    return min(ctx.policy.delay(attempts_before), BUSY_RETRY * 2.0**doublings)


def for_reply(
    recipient: ClaimedRecipient, reply: Reply, ctx: AttemptContext, released: bool
) -> RecipientOutcome:
    """``outcomes.for_reply`` with Exchange Online's meanings; ``released``: the domain was
    released from hold (a migration), which is when 5.4.1 means "not ready yet"."""
    status = reply.enhanced_status
    if reply.code >= 500 and status in ("5.2.121", "5.2.122"):
        # A rate limit dressed as a permanent failure: try again later, never park.
        return outcomes.for_failure(recipient, str(reply), ctx, permanent=False)
    if reply.code == 451 and status == "4.4.62":
        reason = (
            f"wrong route: Exchange Online answered {reply}: the message reached a server "
            "of the wrong region or tenant. Point the domain's route at the target tenant's "
            "MX host ('mxspool domain route DOMAIN --route HOST'), check the target's inbound "
            "connector, then 'mxspool queue retry --parked --domain DOMAIN'"
        )
        return RecipientOutcome(recipient.id, RecipientState.PARKED, reason, ctx.destination)
    if reply.code == 550 and status == "5.4.1" and released:
        return _not_ready(recipient, reply, ctx)
    if is_throttling(reply):
        delay = busy_delay(ctx, recipient.attempts)
        return outcomes.for_failure(recipient, str(reply), ctx, permanent=False, delay=delay)
    return outcomes.for_reply(recipient, reply, ctx)


def _not_ready(recipient: ClaimedRecipient, reply: Reply, ctx: AttemptContext) -> RecipientOutcome:
    waited = ctx.now - ctx.age_start
    if waited >= NOT_READY_FOR:
        reason = (
            f"not ready at target for {format_duration(NOT_READY_FOR)} (re-checked every "
            f"{format_duration(NOT_READY_EVERY)}): {reply}; create the mailbox at the target, "
            "then 'mxspool queue retry --parked --domain DOMAIN'"
        )
        return RecipientOutcome(recipient.id, RecipientState.PARKED, reason, ctx.destination)
    return RecipientOutcome(
        recipient.id,
        RecipientState.PENDING,
        f"not ready at target (re-checked every {format_duration(NOT_READY_EVERY)}): {reply}",
        ctx.destination,
        next_attempt_at=ctx.now + NOT_READY_EVERY,
    )


@dataclass(slots=True)
class _Gcra:
    """Generic cell rate algorithm: one timestamp per key, no sliding windows kept."""

    interval: float
    tolerance: float
    tat: dict[str, float]

    @classmethod
    def per_hour(cls, limit: int) -> _Gcra:
        burst = max(1, limit // BURST_SHARE)
        # The sustained rate leaves room for the burst: burst + rate x 1 h == limit, so no
        # sliding hour ever holds more than the limit.
        interval = 3600.0 / max(1, limit - burst)
        return cls(interval, (burst - 1) * interval, {})

    def reserve(self, key: str, now: float) -> float:
        """Take the next slot for ``key``; when it may be used (``now`` if at once)."""
        tat = max(self.tat.get(key, now), now)
        self.tat[key] = tat + self.interval
        return max(now, tat - self.tolerance)

    def prune(self, now: float) -> None:
        # A key whose time has come is the same as an absent one: forget it.
        for key in [key for key, tat in self.tat.items() if tat <= now]:
            del self.tat[key]


def recipient_drain_seconds(
    messages: int, per_hour: int | None = None, busiest_pair: int = 0
) -> float:
    """How long ``RecipientPacer`` takes to let ``messages`` for one recipient go, of which
    ``busiest_pair`` come from one sender: each limit lets its burst go at once, then one per
    interval, and the slower of the two decides (``release_plan`` shows it before a release)."""

    def drain(gcra: _Gcra, count: int) -> float:
        burst = round(gcra.tolerance / gcra.interval) + 1
        return max(0, count - burst) * gcra.interval

    return max(
        drain(_Gcra.per_hour(per_hour or RECIPIENT_PER_HOUR), messages),
        drain(_Gcra.per_hour(PAIR_PER_HOUR), min(busiest_pair, messages)),
    )


class RecipientPacer:
    """Per-recipient and per-pair hourly limits, one node's share (see the module docstring)."""

    def __init__(self, per_recipient: int | None = None, per_pair: int | None = None) -> None:
        self._recipient = _Gcra.per_hour(per_recipient or RECIPIENT_PER_HOUR)
        self._pair = _Gcra.per_hour(per_pair or PAIR_PER_HOUR)
        self._reserved: dict[int, float] = {}
        """Recipient row id -> the time reserved for it when it was deferred."""
        self._pruned_at = 0.0

    def admit(self, recipient_id: int, sender: str, address: str, now: float) -> float:
        """0.0 when this recipient may be sent now; else when it may (it is deferred)."""
        reserved = self._reserved.pop(recipient_id, None)
        if reserved is not None:
            if reserved <= now + 1.0:
                return 0.0  # its slot was reserved when it was deferred: no second token
            self._reserved[recipient_id] = reserved
            return reserved
        rcpt = address.lower()
        at = max(
            self._recipient.reserve(rcpt, now),
            self._pair.reserve(f"{sender.lower()} {rcpt}", now),
        )
        if at <= now:
            return 0.0
        self._reserved[recipient_id] = at
        self._prune(now)
        return at

    def _prune(self, now: float) -> None:
        if now - self._pruned_at < 60.0:
            return
        self._pruned_at = now
        self._recipient.prune(now)
        self._pair.prune(now)
        # A reservation an hour stale was delivered elsewhere (another node, an operator).
        stale = [rid for rid, at in self._reserved.items() if at < now - 3600.0]
        for rid in stale:
            del self._reserved[rid]
