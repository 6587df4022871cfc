"""Operator actions on the store, shared by the CLI and the admin HTTP API.

Every front end calls these functions, so input validation, the rules of each action (what
``release`` means for a domain in hold, what ``--only`` does) and the audit trail live in one
place. Front ends only parse their own syntax and render the results; the ``*_to_dict``
helpers give both of them the same JSON shapes.

Bad input raises :class:`OperationError` before anything is written, so a rejected command
never changes the store. Store failures surface as :class:`~mxspool.store.base.StoreError`
(``NotFound``, ``Conflict``), whose messages already say what to do.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mxspool import maillog
from mxspool import stage as stages
from mxspool.actor import audit_actor
from mxspool.addresses import ascii_lower, parent_domains
from mxspool.config import Config, is_ip_address, split_host_port
from mxspool.stage import stage
from mxspool.store import purge
from mxspool.store.base import (
    EVERY_ROW,
    FINAL_STATES,
    QUEUE_STATES,
    AttemptRecord,
    AuditEntry,
    CounterDrift,
    Domain,
    DomainChanges,
    DomainMode,
    DomainStatus,
    NotFound,
    PurgeResult,
    QueueEntry,
    QueueFilter,
    RecipientHold,
    ReportRow,
    Route,
    Store,
    StoredMessage,
    TlsMode,
)
from mxspool.units import parse_duration, parse_rate, parse_size

if TYPE_CHECKING:
    from mxspool.delivery.bounce import BounceResult

PROFILES = ("exchange-online",)
"""Per-domain tuning profiles that ``domain add/route --profile`` accept."""

TLS_MODES = tuple(mode.value for mode in TlsMode)

REPORT_COLUMNS = (
    "id",
    "message_id",
    "mail_from",
    "rcpt",
    "size",
    "sha256",
    "received_at",
    "state",
    "attempts",
    "delivered_at",
    "remote_reply",
    "sent_sha256",
    "spf",
    "dkim",
    "dmarc",
    "purged",
)
"""The reconciliation report's columns, in docs/interface.md's order. ``sha256`` is of the
stored bytes; ``sent_sha256`` of the bytes that left for a delivered recipient (with the ARC
set when sealed); spf, dkim, dmarc are the verdicts at arrival (the message's tags)."""

AUTH_TAGS = ("spf", "dkim", "dmarc")
"""Report columns read from the message's ``<name>=<result>`` tags."""

STATUS_COUNTS = (
    "held",
    "pending",
    "delivering",
    "delivered",
    "parked",
    "bounced",
    "discarded",
)

_FINAL_STATE_NAMES = frozenset(state.value for state in FINAL_STATES)
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_MAX_NAME = 253


class OperationError(Exception):
    """The request is not valid; nothing was changed. The message says what to do instead.

    ``exit_code`` is what a command line should exit with: 2 (usage) unless said otherwise.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- validation ----------------------------------------------------------------------------


def _host_labels(name: str, what: str) -> str:
    """``name`` lowercased and in punycode, or OperationError naming ``what``."""
    text = name.strip().rstrip(".").lower()
    if not text:
        raise OperationError(f"{what} is empty; give a name such as example.com")
    try:
        # IDNA 2003 (the codec in the standard library) is enough to turn an operator's
        # "bücher.example" into the A-label form the DNS and the SMTP envelope use.
        ascii_name = text.encode("idna").decode("ascii") if not text.isascii() else text
    except UnicodeError:
        raise OperationError(
            f"{what} {name!r} is not a valid international domain name; check its spelling"
        ) from None
    if len(ascii_name) > _MAX_NAME:
        raise OperationError(f"{what} {name!r} is longer than {_MAX_NAME} characters")
    for label in ascii_name.split("."):
        if not _LABEL.match(label):
            raise OperationError(
                f"{what} {name!r} is not a valid DNS name: each dot-separated part must be "
                "1-63 letters, digits or hyphens, not starting or ending with a hyphen"
            )
    return ascii_name


def normalize_domain(name: str) -> str:
    """The canonical form of a mail domain name, or OperationError saying what is wrong."""
    text = name.strip()
    if text.startswith("[") or is_ip_address(text.strip("[]")):
        raise OperationError(
            f"{name!r} is an IP address; mxspool holds mail for domain names such as example.com"
        )
    if "@" in text:
        raise OperationError(
            f"{name!r} looks like an address; give only the domain part (after the @)"
        )
    ascii_name = _host_labels(text, "domain")
    labels = ascii_name.split(".")
    if len(labels) < 2:
        raise OperationError(
            f"domain {name!r} has no dot; give the full mail domain, e.g. {ascii_name}.com"
        )
    if labels[-1].isdigit():
        raise OperationError(f"domain {name!r} ends in a numeric label; that is not a domain")
    return ascii_name


def parse_route(value: str) -> Route:
    """A route from "host", "host:port", "1.2.3.4:25" or "[2001:db8::1]:25" (port 25 default)."""
    text = value.strip()
    try:
        host, port = split_host_port(text, default_port=25)
    except ValueError as exc:
        raise OperationError(
            f"bad route {value!r}: {exc}; use HOST[:PORT], e.g. mx.example.net:25 or "
            "[2001:db8::1]:25"
        ) from None
    if is_ip_address(host):
        return Route(str(ipaddress.ip_address(host)), port)
    if text.startswith("["):
        raise OperationError(
            f"bad route {value!r}: only IP addresses go in brackets; write a host name as "
            "mx.example.net:25"
        )
    # Route hosts may be single-label (a lab's "relay" or "localhost"), unlike mail domains.
    return Route(_host_labels(host, "route host"), port)


def parse_routes(values: Iterable[str]) -> tuple[Route, ...]:
    routes: list[Route] = []
    for value in values:
        route = parse_route(value)
        if route not in routes:
            routes.append(route)
    return tuple(routes)


def parse_tls(value: str) -> TlsMode:
    try:
        return TlsMode(value.strip().lower())
    except ValueError:
        raise OperationError(
            f"unknown TLS mode {value!r}; use one of {', '.join(TLS_MODES)}"
        ) from None


def parse_profile(value: str) -> str | None:
    """A known profile name, or None for "" / "none" (no profile)."""
    text = value.strip().lower()
    if text in ("", "none"):
        return None
    if text not in PROFILES:
        raise OperationError(
            f"unknown profile {value!r}; use one of {', '.join(PROFILES)} (or none)"
        )
    return text


PLUS_SEPARATORS = "+-_=#~&^$"
"""Characters ``--plus-separator`` takes: dot-atom characters that are not routing syntax."""


def parse_max_size(value: str) -> int | None:
    """Bytes from ``--max-size`` ("36MiB", "150MB", bytes); None for "none" (no own limit)."""
    text = value.strip()
    if text.lower() in ("none", "default", ""):
        return None
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise OperationError(f"--max-size: {exc}, or none for the profile's default") from None
    if size < 1024:
        raise OperationError(
            f"--max-size {value!r} is under 1 KiB; no real message fits. Give e.g. 36MiB"
        )
    return size


def parse_plus_separator(value: str) -> str:
    """The sub-addressing separator: one of PLUS_SEPARATORS, or "" (off)."""
    if len(value) <= 1 and value in PLUS_SEPARATORS:  # "" is in it: off
        return value
    raise OperationError(
        f"--plus-separator {value!r} is not one of {' '.join(PLUS_SEPARATORS)}; give one of "
        "those characters, or --no-plus-addressing to switch plus addressing off"
    )


def _describe_gate(domain: Domain) -> str:
    return (
        f"max_size={domain.max_size if domain.max_size is not None else '-'} "
        f"subdomains={'yes' if domain.subdomains else 'no'} "
        f"plus={domain.plus_separator or 'off'}"
    )


def parse_state(value: str) -> str:
    text = value.strip().lower()
    if text not in QUEUE_STATES:
        raise OperationError(f"unknown state {value!r}; use one of {', '.join(QUEUE_STATES)}")
    return text


def _parse_rate_text(value: str) -> float:
    try:
        return parse_rate(value)
    except ValueError as exc:
        raise OperationError(str(exc)) from None


def _parse_address(address: str, domain: str) -> str:
    local, at, addr_domain = address.strip().rpartition("@")
    if not at or not local:
        raise OperationError(f"{address!r} is not an address; give it as user@{domain}")
    if normalize_domain(addr_domain) != domain:
        raise OperationError(
            f"{address!r} is not in domain {domain}; --only takes an address of that domain"
        )
    return f"{local}@{domain}"


def _describe_routing(routes: tuple[Route, ...], use_mx: bool) -> str:
    shown = ",".join(str(route) for route in routes) or "-"
    return f"routes={shown} mx={'yes' if use_mx else 'no'}"


ADMIN = "admin"
"""The mail log's component for operator actions (``mxspool.maillog``)."""


async def record_action(
    store: Store,
    actor: str,
    action: str,
    target: str,
    detail: str = "",
    *,
    queue_id: str | None = None,
) -> None:
    """An operator action's audit entry, and its mail-log line: under the message's queue id
    when it acts on one message (so ``mxspool log ID`` shows it among that message's arrival
    and delivery lines), else NOQUEUE with its target (a domain, all parked mail...)."""
    await store.record_audit(actor, action, target, detail)
    fields: dict[str, maillog.Value] = {
        "by": audit_actor(actor),
        "target": None if queue_id else target,
        "detail": detail or None,
    }
    maillog.emit(ADMIN, action, queue_id or maillog.NOQUEUE, fields)


async def _require_domain(store: Store, name: str) -> Domain:
    domain = await store.get_domain(name)
    if domain is None:
        raise NotFound(f"no domain {name}; 'mxspool domain list' shows the domains")
    return domain


# -- domains -------------------------------------------------------------------------------


async def add_domain(
    store: Store,
    name: str,
    routes: list[str],
    *,
    use_mx: bool = False,
    tls: str = "verify",
    hold: bool = False,
    profile: str | None = None,
    max_size: str | None = None,
    subdomains: bool = False,
    plus_separator: str = "+",
    actor: str = "cli",
) -> Domain:
    """Configure a domain: mxspool accepts its mail from now on, relaying unless ``hold``.

    ``max_size`` (e.g. "36MiB"): the largest message its target takes; ``subdomains``: accept,
    route and hold its subdomains too; ``plus_separator``: sub-addressing ("" = off).
    """
    domain_name = normalize_domain(name)
    parsed_routes = parse_routes(routes)
    if not parsed_routes and not use_mx:
        raise OperationError(
            f"domain {domain_name} needs a destination: give --route HOST[:PORT] (repeatable), "
            "or --mx to deliver by the domain's MX records"
        )
    domain = Domain(
        name=domain_name,
        mode=DomainMode.HOLD if hold else DomainMode.RELAY,
        routes=parsed_routes,
        use_mx=use_mx,
        tls=parse_tls(tls),
        profile=parse_profile(profile) if profile is not None else None,
        created_at=time.time(),
        max_size=parse_max_size(max_size) if max_size is not None else None,
        subdomains=subdomains,
        plus_separator=parse_plus_separator(plus_separator),
    )
    await store.add_domain(domain)
    await record_action(
        store,
        actor,
        "domain.add",
        domain_name,
        f"mode={domain.mode.value} {_describe_routing(parsed_routes, use_mx)} "
        f"tls={domain.tls.value} profile={domain.profile or '-'} {_describe_gate(domain)}",
    )
    await stages.record(
        store, domain_name, ["planned", *(["holding"] if hold else [])], actor=actor
    )
    return await _require_domain(store, domain_name)


async def list_domains(store: Store) -> list[Domain]:
    return await store.list_domains()


@dataclass(frozen=True, slots=True)
class DomainDetail:
    domain: Domain
    status: DomainStatus


async def show_domain(store: Store, name: str, now: float | None = None) -> DomainDetail:
    """The domain's configuration and its recipient counts."""
    domain = await _require_domain(store, normalize_domain(name))
    status = await _domain_status(store, domain, time.time() if now is None else now)
    return DomainDetail(domain, status)


async def _domain_status(store: Store, domain: Domain, now: float) -> DomainStatus:
    for entry in await store.status(now):
        if entry.domain == domain.name:
            return entry
    return DomainStatus(domain=domain.name, mode=domain.mode)


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What ``domain route`` (or ``migration route``, for each of its domains) asks to change;
    None leaves a field as it is."""

    routes: list[str] | None = None
    use_mx: bool | None = None
    tls: str | None = None
    profile: str | None = None
    max_size: str | None = None
    subdomains: bool | None = None
    plus_separator: str | None = None

    def check(self) -> None:
        """OperationError when nothing is asked or a value is not valid."""
        if all(getattr(self, key) is None for key in self.__slots__):
            raise OperationError(
                "nothing to change; give --route HOST[:PORT], --mx, --tls MODE, --profile NAME, "
                "--max-size SIZE, --subdomains or --plus-separator C"
            )
        self._parsed()

    def _parsed(self) -> tuple[Any, ...]:
        return (
            parse_max_size(self.max_size) if self.max_size is not None else None,
            parse_plus_separator(self.plus_separator) if self.plus_separator is not None else None,
            parse_routes(self.routes) if self.routes is not None else None,
            parse_tls(self.tls) if self.tls is not None else None,
            parse_profile(self.profile) if self.profile is not None else None,
        )

    def changes(self, current: Domain) -> DomainChanges:
        """The changes to ``current``; OperationError when it would have no destination.

        ``routes`` replaces the routes as a whole; when routes are given and ``use_mx`` is
        not, MX routing is switched off, because a new static route list is a complete
        statement of where mail should go. ``profile=""`` removes the profile.
        """
        new_max_size, new_separator, new_routes, new_tls, new_profile = self._parsed()
        routes, use_mx = self.routes, self.use_mx
        effective_mx = use_mx if use_mx is not None else (False if routes else current.use_mx)
        effective_routes = new_routes if new_routes is not None else current.routes
        if not effective_routes and not effective_mx:
            raise OperationError(
                f"domain {current.name} would have no destination; give --route HOST[:PORT] or --mx"
            )
        return DomainChanges(
            routes=new_routes,
            use_mx=effective_mx,
            tls=new_tls,
            # The store treats "" as "clear the profile" and None as "leave it".
            profile=(new_profile or "") if self.profile is not None else None,
            max_size=new_max_size,
            clear_max_size=self.max_size is not None and new_max_size is None,
            subdomains=self.subdomains,
            plus_separator=new_separator,
        )


def describe_route(updated: Domain) -> str:
    """The audit detail of a route change."""
    return (
        f"{_describe_routing(updated.routes, updated.use_mx)} tls={updated.tls.value} "
        f"profile={updated.profile or '-'} {_describe_gate(updated)}"
    )


async def route_domain(
    store: Store,
    name: str,
    routes: list[str] | None = None,
    *,
    use_mx: bool | None = None,
    tls: str | None = None,
    profile: str | None = None,
    max_size: str | None = None,
    subdomains: bool | None = None,
    plus_separator: str | None = None,
    actor: str = "cli",
) -> Domain:
    """Change where a domain's mail goes, and its recipient gate.

    ``routes`` replaces the routes as a whole; when routes are given and ``use_mx`` is not,
    MX routing is switched off, because a new static route list is a complete statement of
    where mail should go. ``profile=""`` removes the profile.
    """
    domain_name = normalize_domain(name)
    asked = RouteRequest(routes, use_mx, tls, profile, max_size, subdomains, plus_separator)
    asked.check()
    current = await _require_domain(store, domain_name)
    changes = asked.changes(current)
    updated = await store.update_domain(domain_name, changes)
    await record_action(store, actor, "domain.route", domain_name, describe_route(updated))
    return updated


async def hold_domain(store: Store, name: str, *, actor: str = "cli") -> Domain:
    """Keep the domain's mail: accepted, stored, not delivered until released."""
    domain_name = normalize_domain(name)
    current = await _require_domain(store, domain_name)
    updated = await store.update_domain(domain_name, DomainChanges(mode=DomainMode.HOLD))
    await record_action(store, actor, "domain.hold", domain_name, f"was={current.mode.value}")
    await stages.record(store, domain_name, ["holding"], actor=actor)
    return updated


@dataclass(frozen=True, slots=True)
class ReleaseResult:
    domain: Domain
    canary: str | None = None
    """The address released alone (``only``); the domain then stays in hold."""
    released_recipients: int = 0
    """How many recipient rows the canary release let go."""


async def release_domain(
    store: Store,
    name: str,
    rate: str | None = None,
    only: str | None = None,
    *,
    actor: str = "cli",
    now: float | None = None,
) -> ReleaseResult:
    """Let the domain's mail go (``relay`` mode), or with ``only`` just one recipient's.

    Releasing a domain that already relays is harmless; ``released_at`` records the moment
    the hold ended, so it is set only when the domain was in hold. ``rate`` (e.g. "600/min")
    paces deliveries to this domain from now on.
    """
    domain_name = normalize_domain(name)
    rate_value = _parse_rate_text(rate) if rate is not None else None
    address = _parse_address(only, domain_name) if only is not None else None
    current = await _require_domain(store, domain_name)
    rate_detail = f" rate={rate}" if rate is not None else ""
    if address is not None:
        domain = current
        if rate_value is not None:
            domain = await store.update_domain(domain_name, DomainChanges(rate=rate_value))
        # A recipient hold (hold --recipient) of the address ends here too: its rows are due.
        unheld = await store.release_recipient_hold(address)
        count = await store.release_recipient(domain_name, address)
        if unheld is not None:
            count = max(count, unheld)
            rate_detail += f" recipient_hold={unheld}"
        await record_action(
            store,
            actor,
            "domain.release",
            domain_name,
            f"only={address} recipients={count}{rate_detail}",
        )
        return ReleaseResult(domain, canary=address, released_recipients=count)
    at = time.time() if now is None else now
    was_held = current.mode is DomainMode.HOLD
    changes = DomainChanges(
        mode=DomainMode.RELAY,
        rate=rate_value,
        released_at=at if was_held else None,
    )
    updated = await store.update_domain(domain_name, changes)
    await record_action(
        store, actor, "domain.release", domain_name, f"was={current.mode.value}{rate_detail}"
    )
    if was_held:
        await stages.record(store, domain_name, ["released"], actor=actor, at=at)
    return ReleaseResult(updated)


async def remove_domain(
    store: Store, name: str, force: bool = False, *, actor: str = "cli"
) -> None:
    """Stop accepting mail for the domain; refused (Conflict) while mail is open, unless force."""
    domain_name = normalize_domain(name)
    await store.remove_domain(domain_name, force=force)
    await record_action(store, actor, "domain.remove", domain_name, "force" if force else "")


# -- queue ---------------------------------------------------------------------------------


async def queue_list(
    store: Store, filter: QueueFilter = EVERY_ROW, *, limit: int = 100, after: int | None = None
) -> list[QueueEntry]:
    """Recipient rows matching ``filter``, oldest first; ``after`` is the last
    ``recipient_id`` already seen. The filter's fields are checked and normalised here (a
    bad state or domain is an OperationError); empty fields match everything.
    """
    if limit < 1:
        raise OperationError(f"limit must be at least 1, not {limit}")
    if after is not None and after < 0:
        raise OperationError(f"after must be a recipient id (0 or more), not {after}")
    tag = filter.tag.strip().lower() if filter.tag else None
    checked = QueueFilter(
        domain=normalize_domain(filter.domain) if filter.domain else None,
        state=parse_state(filter.state) if filter.state else None,
        search=filter.search or None,
        tag=tag or None,
    )
    return await store.list_queue(checked, limit=limit, after=after)


@dataclass(frozen=True, slots=True)
class MessageDetail:
    message: StoredMessage
    attempts: list[AttemptRecord]


def _check_message_id(message_id: str) -> str:
    text = message_id.strip()
    if not text:
        raise OperationError("give a queue id; 'mxspool queue list' shows them")
    return text


async def queue_show(store: Store, message_id: str) -> MessageDetail:
    queue_id = _check_message_id(message_id)
    message = await store.get_message(queue_id)
    if message is None:
        raise NotFound(f"no message {queue_id}; 'mxspool queue list' shows the queue")
    return MessageDetail(message, await store.attempts(queue_id))


async def queue_export(store: Store, message_id: str) -> AsyncIterator[bytes]:
    """The message exactly as stored, in pieces; NotFound before the first piece if unknown."""
    queue_id = _check_message_id(message_id)
    async for piece in store.read_body(queue_id):
        yield piece


async def queue_discard(store: Store, message_id: str, *, actor: str = "cli") -> int:
    """Give up on every recipient of the message not yet final; the number changed."""
    queue_id = _check_message_id(message_id)
    count = await store.discard(queue_id)
    await record_action(
        store, actor, "queue.discard", queue_id, f"recipients={count}", queue_id=queue_id
    )
    return count


async def queue_bounce(
    store: Store, config: Config, message_id: str, *, force: bool = False, actor: str = "cli"
) -> BounceResult:
    """Send an RFC 3464 DSN to the reverse-path (never to <>), then mark the message bounced.

    The DSN is withheld (the message is still bounced; the result and the audit entry say why)
    when it would be backscatter or reach an internal address, unless ``force``
    (``mxspool.delivery.bounce``).
    """
    from mxspool.delivery.bounce import BounceError, bounce_message

    queue_id = _check_message_id(message_id)
    try:
        result = await bounce_message(config, store, queue_id, force=force)
    except BounceError as exc:
        raise OperationError(str(exc), exit_code=1) from None
    if result.sent:
        detail = f"dsn_to=<{result.recipient}> reply={result.reply}"
        detail += " forced" if result.forced else ""
    else:
        detail = f"dsn_withheld to=<{result.recipient}> reason={result.withheld}"
    await record_action(store, actor, "queue.bounce", queue_id, detail, queue_id=queue_id)
    return result


def bounce_result_to_dict(message_id: str, result: BounceResult) -> dict[str, Any]:
    return {
        "id": message_id,
        "dsn_to": result.recipient,
        "sent": result.sent,
        "reply": None if result.reply is None else str(result.reply),
        "withheld": result.withheld or None,
        "forced": result.forced,
        "reported": result.reported,
    }


async def queue_retry(
    store: Store,
    message_id: str | None = None,
    *,
    parked: bool = False,
    domain: str | None = None,
    actor: str = "cli",
) -> int:
    """Put parked recipients back to pending: of one message, or (``parked``) all of them."""
    if (message_id is None) == (not parked):
        raise OperationError(
            "give exactly one of: a queue ID, or --parked (all parked mail, optionally --domain)"
        )
    domain_name = normalize_domain(domain) if domain else None
    queue_id = _check_message_id(message_id) if message_id is not None else None
    count = await store.retry(message_id=queue_id, domain=domain_name)
    target = queue_id or f"parked{'@' + domain_name if domain_name else ''}"
    await record_action(
        store, actor, "queue.retry", target, f"recipients={count}", queue_id=queue_id
    )
    return count


async def queue_flush(
    store: Store, domain: str | None = None, *, actor: str = "cli", now: float | None = None
) -> int:
    """Make every deferred recipient due now (``postqueue -f``), of one domain or all: for when
    a route comes back. Mail in hold and recipient holds stay; the recipients made due."""
    domain_name = normalize_domain(domain) if domain else None
    if domain_name is not None:
        await _require_domain(store, domain_name)
    count = await store.flush_queue(time.time() if now is None else now, domain_name)
    await record_action(store, actor, "queue.flush", domain_name or "*", f"recipients={count}")
    return count


async def hold_recipient(store: Store, address: str, *, actor: str = "cli") -> RecipientHold:
    """Keep one mailbox's mail (and its sub-addresses') held while its domain is released,
    until ``domain release DOMAIN --only ADDRESS``; new mail for it is held too."""
    local, at, domain_part = address.strip().rpartition("@")
    if not at or not local or any(char in local for char in ' "<>\\'):
        raise OperationError(f"{address!r} is not an address; give it as user@example.com")
    domain_name = normalize_domain(domain_part)
    configured = {item.name: item for item in await store.list_domains()}
    owner = configured.get(domain_name)
    if owner is None:
        owner = next(
            (
                configured[name]
                for name in parent_domains(domain_name)
                if name in configured and configured[name].subdomains
            ),
            None,
        )
    if owner is None:
        raise OperationError(
            f"{domain_name} is not a configured domain; 'mxspool domain list' shows them",
            exit_code=1,
        )
    key = f"{ascii_lower(local)}@{domain_name}"
    separator = owner.plus_separator
    base = ascii_lower(local).split(separator, 1)[0] if separator else ascii_lower(local)
    hold = RecipientHold(
        address=key,
        domain=domain_name,
        # A sub-address (local+tag) of the held address lands in the same mailbox: held too.
        # Holding a sub-address holds only itself.
        prefix=f"{base}{separator}" if separator and base == ascii_lower(local) else "",
        suffix=f"@{domain_name}",
        created_at=time.time(),
        actor=audit_actor(actor),
    )
    marked = await store.hold_recipient(hold)
    await record_action(store, actor, "recipient.hold", key, f"recipients={marked}")
    holds = await store.recipient_holds(domain_name)
    return next((item for item in holds if item.address == key), hold)


async def recipient_holds(store: Store, domain: str | None = None) -> list[RecipientHold]:
    """Every recipient hold (of ``domain``), with the messages each keeps."""
    return await store.recipient_holds(normalize_domain(domain) if domain else None)


def recipient_hold_to_dict(hold: RecipientHold) -> dict[str, Any]:
    return {
        "address": hold.address,
        "domain": hold.domain,
        "sub_addresses": bool(hold.prefix),
        "held": hold.held,
        "since": iso_time(hold.created_at),
        "by": hold.actor,
    }


# -- status, report, audit -----------------------------------------------------------------


def _age(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def status_entry_to_dict(entry: DomainStatus) -> dict[str, Any]:
    data: dict[str, Any] = {"domain": entry.domain, "mode": entry.mode.value}
    for key in STATUS_COUNTS:
        data[key] = getattr(entry, key)
    data["oldest_pending_age_s"] = _age(entry.oldest_pending_age_s)
    data["delivery_rate_per_min"] = entry.delivered_last_minute
    return data


STAGE_EVENT_LIMIT = 10_000
"""Stage events read for each domain's migration stage (``mxspool.stage``)."""


async def status(store: Store, now: float | None = None) -> dict[str, Any]:
    """Counts per domain and in total, in docs/interface.md's ``status --json`` shape.

    Each configured domain also has its migration ``stage`` (planned ... done).
    """
    entries = await store.status(time.time() if now is None else now)
    domains = [status_entry_to_dict(entry) for entry in entries]
    configured = {domain.name: domain for domain in await store.list_domains()}
    events = await store.stage_events(list(configured), STAGE_EVENT_LIMIT) if configured else []
    for row, entry in zip(domains, entries, strict=True):
        known = configured.get(entry.domain)
        row["stage"] = stage(known, entry, events) if known is not None else None
    totals: dict[str, Any] = {key: sum(row[key] for row in domains) for key in STATUS_COUNTS}
    ages = [row["oldest_pending_age_s"] for row in domains if row["oldest_pending_age_s"]]
    totals["oldest_pending_age_s"] = max(ages) if ages else None
    totals["delivery_rate_per_min"] = sum(row["delivery_rate_per_min"] for row in domains)
    result: dict[str, Any] = {"domains": domains, "totals": totals}
    holds = await store.recipient_holds()
    if holds:  # hold --recipient; the key is there only when there are some
        result["recipient_holds"] = [recipient_hold_to_dict(item) for item in holds]
    return result


@dataclass(frozen=True, slots=True)
class StoreCheck:
    """``check store``: the recipient counters against a recount of the rows."""

    drift: list[CounterDrift]
    repaired: bool

    @property
    def ok(self) -> bool:
        return not self.drift or self.repaired


async def check_store(store: Store, *, repair: bool = False, actor: str = "cli") -> StoreCheck:
    """Recount every recipient row by (domain, state) and compare with the counters that
    ``status`` reads; with ``repair``, reset the counters that drifted to the recount."""
    drift = await store.check_counters(repair=repair)
    if repair and drift:
        await record_action(
            store, actor, "store.repair", "recipient_counts", f"counters reset={len(drift)}"
        )
    return StoreCheck(drift, repaired=repair and bool(drift))


async def purge_delivered(
    store: Store, older_than: str | float, *, dry_run: bool = False, actor: str = "cli"
) -> PurgeResult:
    """Drop the bodies of mail delivered longer than ``older_than`` ago (e.g. ``30d``); the
    ledger rows stay (see store/purge.py)."""
    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        raise OperationError(f"--delivered-older-than: {exc} (e.g. 30d, 12h)") from None
    if age < 3600:
        raise OperationError(
            f"--delivered-older-than {older_than} is under an hour; purge is for retention "
            "(e.g. 30d), not to empty the spool"
        )
    result = await store.purge_delivered(time.time() - age, dry_run=dry_run)
    if not dry_run:
        detail = f"older_than={older_than} messages={result.messages} bytes={result.bytes}"
        await record_action(store, actor, "store.purge", "delivered", detail)
    return result


def store_check_to_dict(check: StoreCheck) -> dict[str, Any]:
    return {
        "ok": check.ok,
        "repaired": check.repaired,
        "drift": [
            {
                "domain": item.domain,
                "state": item.state,
                "released": item.released,
                "counted": item.counted,
                "actual": item.actual,
            }
            for item in check.drift
        ],
    }


def iso_time(value: float | None) -> str | None:
    """ISO 8601 in UTC with a Z, as reports and JSON show times."""
    if value is None:
        return None
    return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def report_row_to_dict(row: ReportRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "message_id": row.message_id,
        "mail_from": row.mail_from,
        "rcpt": row.rcpt,
        "size": row.size,
        "sha256": row.sha256,
        "received_at": iso_time(row.received_at),
        "state": row.state,
        "attempts": row.attempts,
        "delivered_at": iso_time(row.delivered_at),
        "remote_reply": row.remote_reply,
        "sent_sha256": row.sent_sha256,
        **_auth_tags(row.tags),
        "purged": purge.purged_at(row.tags),  # when `mxspool purge` dropped the body
    }


def _auth_tags(tags: tuple[str, ...]) -> dict[str, str | None]:
    """``{"spf": "pass", "dkim": None, ...}`` from tags like ``spf=pass``."""
    found: dict[str, str | None] = dict.fromkeys(AUTH_TAGS)
    for tag in tags:
        name, sep, result = tag.partition("=")
        if sep and name in found:
            found[name] = result
    return found


async def report(store: Store, domain: str | None = None) -> AsyncIterator[dict[str, Any]]:
    """One row per recipient of each message, with REPORT_COLUMNS as keys."""
    domain_name = normalize_domain(domain) if domain else None
    async for row in store.report(domain_name):
        yield report_row_to_dict(row)


def is_final(row: dict[str, Any]) -> bool:
    return row["state"] in _FINAL_STATE_NAMES


async def report_check(store: Store, domain: str | None = None) -> AsyncIterator[dict[str, Any]]:
    """The report rows whose recipient is not final (not delivered, discarded or bounced)."""
    async for row in report(store, domain):
        if not is_final(row):
            yield row


async def audit_list(store: Store, limit: int = 100) -> list[AuditEntry]:
    if limit < 1:
        raise OperationError(f"limit must be at least 1, not {limit}")
    return await store.list_audit(limit)


# -- JSON shapes shared by the CLI and the admin API -------------------------------------


def domain_to_dict(domain: Domain) -> dict[str, Any]:
    return {
        "domain": domain.name,
        "mode": domain.mode.value,
        "routes": [str(route) for route in domain.routes],
        "mx": domain.use_mx,
        "tls": domain.tls.value,
        "rate_per_s": domain.rate,
        "profile": domain.profile,
        "max_size": domain.max_size,
        "subdomains": domain.subdomains,
        "plus_separator": domain.plus_separator or None,
        "created_at": iso_time(domain.created_at),
        "released_at": iso_time(domain.released_at),
    }


def domain_detail_to_dict(detail: DomainDetail) -> dict[str, Any]:
    counts = status_entry_to_dict(detail.status)
    del counts["domain"], counts["mode"]
    return {**domain_to_dict(detail.domain), "status": counts}


def queue_entry_to_dict(entry: QueueEntry) -> dict[str, Any]:
    return {
        "id": entry.message_id,
        "recipient_id": entry.recipient_id,
        "rcpt": entry.rcpt,
        "domain": entry.domain,
        "mail_from": entry.mail_from,
        "size": entry.size,
        "received_at": iso_time(entry.received_at),
        "state": entry.state,
        "attempts": entry.attempts,
        "last_reply": entry.last_reply,
    }


def message_detail_to_dict(detail: MessageDetail) -> dict[str, Any]:
    message = detail.message
    params = message.mail_params
    client = message.client
    return {
        "id": message.id,
        "message_id": message.message_id,
        "received_at": iso_time(message.received_at),
        "mail_from": message.mail_from,
        "mail_params": {
            "size": params.size,
            "body": params.body,
            "smtputf8": params.smtputf8,
            "ret": params.ret,
            "envid": params.envid,
        },
        "size": message.size,
        "sha256": message.sha256,
        "client": {
            "address": client.address,
            "helo": client.helo,
            "hostname": client.hostname,
            "tls_version": client.tls_version,
            "tls_cipher": client.tls_cipher,
        },
        "tags": list(message.tags),
        "recipients": [
            {
                "recipient_id": rcpt.id,
                "rcpt": rcpt.address,
                "domain": rcpt.domain,
                "notify": list(rcpt.params.notify) if rcpt.params.notify is not None else None,
                "orcpt": rcpt.params.orcpt,
                "state": "held" if rcpt.held else rcpt.state.value,
                "attempts": rcpt.attempts,
                "next_attempt_at": iso_time(rcpt.next_attempt_at or None),
                "last_reply": rcpt.last_reply,
                "delivered_at": iso_time(rcpt.delivered_at),
            }
            for rcpt in message.recipients
        ],
        "attempts": [
            {
                "rcpt": attempt.recipient,
                "at": iso_time(attempt.at),
                "destination": attempt.destination,
                "outcome": attempt.outcome,
                "reply": attempt.reply,
            }
            for attempt in detail.attempts
        ],
    }


def audit_to_dict(entry: AuditEntry) -> dict[str, Any]:
    return {
        "at": iso_time(entry.at),
        "actor": entry.actor,
        "action": entry.action,
        "target": entry.target,
        "detail": entry.detail,
    }
