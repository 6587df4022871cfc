"""A migration as one object: several domains moved together from a source to a target tenant.

A tenant-to-tenant move detaches every accepted domain of the source tenant in one window, so
the operator acts on the migration, not domain by domain: ``hold``, ``release`` and ``route``
change every domain in ONE store transaction (``Store.apply_transition``: a crash never leaves
half the domains released) and write ONE audit entry naming the migration and its domains.
Each domain keeps its own commands (``domain ...``) for the exceptions.

A release may be scheduled (``--at``): the time and rate are stored on the migration and the
running serve performs it (``run_due``, from ``component``), once even with several nodes
(the transition only applies while the schedule is still the one it read).

Stages are recorded as events (``mxspool.stage``): ``planned`` when a domain joins a migration
without a history, ``holding``/``released`` with the transition itself, the engineer's manual
steps (``step``), and ``relaying``/``done`` from the counters (``advance_stages``, also run by
the serve's component, so the intake never writes per message).

The runbook (``runbook``) and the release plan (``release_plan``) are the per-domain
functions (:func:`mxspool.migrate.actions.migration_runbook`,
:func:`mxspool.migrate.releaseplan.plan_release`) given the migration's domains and tenants.

Like :mod:`mxspool.operations`, input is validated before anything is written and every error
says what to do next.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mxspool import operations as ops
from mxspool import stage as stages
from mxspool.config import Config
from mxspool.migrate import actions, releaseplan
from mxspool.migrate.probe import PROBE_TAG
from mxspool.operations import OperationError, RouteRequest, normalize_domain, record_action
from mxspool.store.base import (
    AuditEntry,
    Conflict,
    Domain,
    DomainChanges,
    DomainMode,
    DomainStatus,
    DomainsTransition,
    Migration,
    MigrationChanges,
    NotFound,
    QueueFilter,
    StageEvent,
    Store,
    StoreError,
)
from mxspool.units import parse_duration, parse_rate

log = logging.getLogger(__name__)

MAX_DOMAINS = 500
"""Domains in one migration; a tenant's accepted domains are far fewer."""
MAX_NOTE = 500
"""Characters of a ``step --note``."""
MAX_AHEAD = 90 * 86400.0
"""How far ahead ``release --at`` may be scheduled."""
TICK = 1.0
"""Seconds between the serve's looks for due scheduled releases and stage changes."""
PROBE_COUNT_LIMIT = 1000
"""Probe rows counted per domain when deciding ``relaying`` (more means mail anyway)."""

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")


# -- validation ----------------------------------------------------------------------------


def normalize_name(name: str) -> str:
    text = name.strip().lower()
    if not _NAME.match(text):
        raise OperationError(
            f"migration name {name!r} is not valid: 1-63 letters, digits, dots, hyphens or "
            "underscores, starting with a letter or digit (e.g. contoso-to-fabrikam)"
        )
    return text


def tenant_label(value: str | None, option: str) -> str | None:
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if not _LABEL.match(text):
        raise OperationError(
            f"{option} {value!r} is not a tenant label: up to 100 letters, digits and . _ @ -, "
            "e.g. fabrikam.onmicrosoft.com"
        )
    return text


def _domains(names: Sequence[str]) -> list[str]:
    found = list(dict.fromkeys(normalize_domain(name) for name in names))
    if len(found) > MAX_DOMAINS:
        raise OperationError(f"{len(found)} domains; a migration takes at most {MAX_DOMAINS}")
    return found


def parse_at(value: str, now: float) -> float:
    """When ``release --at`` means: ISO 8601 (no zone: UTC) or "+2h" (from now)."""
    text = value.strip()
    if text.startswith("+"):
        try:
            at = now + parse_duration(text[1:])
        except ValueError as exc:
            raise OperationError(f"--at {value!r}: {exc} (e.g. +2h)") from None
    else:
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise OperationError(
                f"--at {value!r} is not a time; give ISO 8601 such as 2025-06-01T22:00:00Z "
                "(no zone: UTC) or +2h from now"
            ) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        at = parsed.timestamp()
    if at <= now:
        raise OperationError(f"--at {value} is in the past; give a later time, or no --at")
    if at - now > MAX_AHEAD:
        raise OperationError(f"--at {value} is more than 90 days ahead; schedule it later")
    return at


def _rate(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_rate(value)
    except ValueError as exc:
        raise OperationError(f"--rate: {exc}") from None


async def require(store: Store, name: str) -> Migration:
    found = await store.get_migration(normalize_name(name))
    if found is None:
        raise NotFound(
            f"no migration {name}; 'mxspool migration list' shows them, 'mxspool migration "
            "create NAME --domain D' makes one"
        )
    return found


def _audit(actor: str, action: str, migration: Migration, detail: str = "") -> AuditEntry:
    domains = ",".join(migration.domains) or "-"
    text = f"domains={domains}" + (f" {detail}" if detail else "")
    return AuditEntry(time.time(), actor, action, migration.name, text)


async def _record_audit(store: Store, entry: AuditEntry) -> None:
    await record_action(store, entry.actor, entry.action, entry.target, entry.detail)


# -- create, change, remove ------------------------------------------------------------------


async def _planned(store: Store, migration: str, domains: Sequence[str], actor: str) -> None:
    """``planned`` for the domains that have no stage yet (others keep where they are)."""
    known = {event.domain for event in await store.stage_events(list(domains))}
    await store.record_stage_events(
        [
            StageEvent(domain, "planned", time.time(), actor, "", migration)
            for domain in domains
            if domain not in known
        ]
    )


async def create(
    store: Store,
    name: str,
    domains: Sequence[str],
    *,
    source_tenant: str | None = None,
    target_tenant: str | None = None,
    actor: str = "cli",
) -> Migration:
    """A new migration of ``domains`` (configured already, in no other migration)."""
    migration = Migration(
        normalize_name(name),
        tuple(_domains(domains)),
        tenant_label(source_tenant, "--source-tenant"),
        tenant_label(target_tenant, "--target-tenant"),
        created_at=time.time(),
    )
    if not migration.domains:
        raise OperationError("give the migration's domains: --domain D (repeatable)")
    await store.add_migration(migration)
    tenants = f"source={migration.source_tenant or '-'} target={migration.target_tenant or '-'}"
    await _record_audit(store, _audit(actor, "migration.create", migration, tenants))
    await _planned(store, migration.name, migration.domains, actor)
    return await require(store, migration.name)


async def change_domains(
    store: Store,
    name: str,
    *,
    add: Sequence[str] = (),
    remove: Sequence[str] = (),
    actor: str = "cli",
) -> Migration:
    """Add or remove domains; the domains themselves and their mail are not touched."""
    current = await require(store, name)
    added, removed = _domains(add), _domains(remove)
    if not added and not removed:
        raise OperationError("give the domains to add or remove")
    if len(set(current.domains) | set(added)) > MAX_DOMAINS:
        raise OperationError(f"a migration takes at most {MAX_DOMAINS} domains")
    updated = await store.change_migration_domains(current.name, added, removed)
    detail = " ".join(
        part
        for part in (
            f"added={','.join(added)}" if added else "",
            f"removed={','.join(removed)}" if removed else "",
        )
        if part
    )
    action = "migration.add-domain" if added else "migration.remove-domain"
    await _record_audit(store, _audit(actor, action, updated, detail))
    if added:
        await _planned(store, updated.name, added, actor)
    return updated


async def remove(store: Store, name: str, *, actor: str = "cli") -> Migration:
    """Forget the migration; its domains, their mail and their stage history stay."""
    current = await require(store, name)
    await store.remove_migration(current.name)
    await _record_audit(store, _audit(actor, "migration.remove", current))
    return current


async def step(
    store: Store, name: str, domain: str, what: str, note: str = "", *, actor: str = "cli"
) -> StageEvent:
    """The engineer confirms a manual step for one domain (detached, attached, verified)."""
    current = await require(store, name)
    domain_name = normalize_domain(domain)
    if what not in stages.MANUAL_STEPS:
        raise OperationError(f"unknown step {what!r}; use one of {', '.join(stages.MANUAL_STEPS)}")
    if domain_name not in current.domains:
        raise OperationError(
            f"domain {domain_name} is not in migration {current.name}; its domains: "
            f"{', '.join(current.domains) or 'none'}"
        )
    text = " ".join(note.split())
    if len(text) > MAX_NOTE:
        raise OperationError(f"--note is longer than {MAX_NOTE} characters; shorten it")
    event = StageEvent(domain_name, what, time.time(), actor, text, current.name)
    await store.record_stage_events([event])
    await record_action(
        store,
        actor,
        "migration.step",
        current.name,
        f"domain={domain_name} step={what} note={text}",
    )
    return event


# -- hold, release, route ------------------------------------------------------------------


async def _current(store: Store, migration: Migration) -> list[Domain]:
    if not migration.domains:
        raise OperationError(
            f"migration {migration.name} has no domains; add some with 'mxspool migration "
            f"add-domain {migration.name} DOMAIN'"
        )
    found = []
    for name in migration.domains:
        domain = await store.get_domain(name)
        if domain is None:
            raise NotFound(f"domain {name} of migration {migration.name} is gone")
        found.append(domain)
    return found


async def hold(store: Store, name: str, *, actor: str = "cli") -> list[Domain]:
    """Every domain in hold, in one transaction, audited once."""
    migration = await require(store, name)
    domains = await _current(store, migration)
    now = time.time()
    was = ",".join(f"{d.name}:{d.mode.value}" for d in domains)
    transition = DomainsTransition(
        {d.name: DomainChanges(mode=DomainMode.HOLD) for d in domains},
        [StageEvent(d.name, "holding", now, actor, "", migration.name) for d in domains],
        _audit(actor, "migration.hold", migration, f"was={was}"),
        migration.name,
    )
    return await store.apply_transition(transition)


@dataclass(frozen=True, slots=True)
class ReleaseOutcome:
    domains: list[Domain]
    rate: float | None = None
    scheduled_at: float | None = None
    """Set when the release was scheduled (``--at``) rather than done."""
    cancelled: bool = False
    canary: ops.ReleaseResult | None = None


async def release_now(
    store: Store,
    migration: Migration,
    rate: float | None,
    *,
    actor: str,
    scheduled: float | None = None,
) -> list[Domain]:
    """Every domain relays, in one transaction; ``scheduled``: the schedule being performed
    (Conflict when another node did it or it was changed meanwhile)."""
    domains = await _current(store, migration)
    now = time.time()
    held = [d.name for d in domains if d.mode is DomainMode.HOLD]
    changes = {
        d.name: DomainChanges(
            mode=DomainMode.RELAY,
            rate=rate,
            released_at=now if d.mode is DomainMode.HOLD else None,
        )
        for d in domains
    }
    rate_text = "-" if rate is None else f"{rate * 60:g}/min"
    detail = f"rate={rate_text} was_held={','.join(held) or '-'}"
    if scheduled is not None:
        detail += f" scheduled={ops.iso_time(scheduled)}"
    transition = DomainsTransition(
        changes,
        [StageEvent(name, "released", now, actor, "", migration.name) for name in held],
        _audit(actor, "migration.release", migration, detail),
        migration.name,
        # A release done now also ends any schedule: it would find nothing left to do.
        MigrationChanges(release_rate=rate, clear_release_at=True),
        expect_release_at=scheduled,
    )
    return await store.apply_transition(transition)


async def release(
    store: Store,
    name: str,
    *,
    rate: str | None = None,
    only: str | None = None,
    at: str | None = None,
    cancel: bool = False,
    actor: str = "cli",
    now: float | None = None,
) -> ReleaseOutcome:
    """Release every domain now, or schedule it (``at``), or cancel the schedule, or release
    one recipient (``only``, a canary: its domain stays in hold)."""
    migration = await require(store, name)
    when = time.time() if now is None else now
    if sum(bool(x) for x in (only, at, cancel)) > 1:
        raise OperationError("give at most one of --only, --at and --cancel")
    rate_value = _rate(rate)
    if cancel:
        if migration.release_at is None:
            raise OperationError(f"no release of {migration.name} is scheduled; nothing to cancel")
        await store.update_migration(migration.name, MigrationChanges(clear_release_at=True))
        await _record_audit(
            store,
            _audit(
                actor, "migration.cancel", migration, f"was={ops.iso_time(migration.release_at)}"
            ),
        )
        return ReleaseOutcome(await _current(store, migration), cancelled=True)
    if only is not None:
        domain = only.strip().rpartition("@")[2]
        domain_name = normalize_domain(domain) if domain else ""
        if domain_name not in migration.domains:
            raise OperationError(
                f"{only!r} is not an address of a domain of migration {migration.name} "
                f"({', '.join(migration.domains) or 'none'})"
            )
        result = await ops.release_domain(store, domain_name, rate=rate, only=only, actor=actor)
        return ReleaseOutcome(await _current(store, migration), rate_value, canary=result)
    if at is not None:
        moment = parse_at(at, when)
        await _current(store, migration)  # refuse a migration with no domains now
        changes = MigrationChanges(release_at=moment, release_rate=rate_value)
        await store.update_migration(migration.name, changes)
        await _record_audit(
            store,
            _audit(
                actor,
                "migration.schedule",
                migration,
                f"at={ops.iso_time(moment)} rate={rate or '-'}",
            ),
        )
        return ReleaseOutcome(await _current(store, migration), rate_value, scheduled_at=moment)
    domains = await release_now(store, migration, rate_value, actor=actor)
    return ReleaseOutcome(domains, rate_value)


async def route(
    store: Store, name: str, request: RouteRequest, *, actor: str = "cli"
) -> list[Domain]:
    """``domain route``'s options applied to every domain, in one transaction, audited once."""
    request.check()
    migration = await require(store, name)
    domains = await _current(store, migration)
    changes = {d.name: request.changes(d) for d in domains}
    updated = await store.apply_transition(DomainsTransition(changes, migration=migration.name))
    detail = "; ".join(f"{d.name}: {ops.describe_route(d)}" for d in updated)
    await _record_audit(store, _audit(actor, "migration.route", migration, detail))
    return updated


# -- runbook and release plan (the per-domain functions, given the migration's domains) ------

_INITIAL_SUFFIXES = (".onmicrosoft.com", ".onmicrosoft.us", ".partner.onmschina.cn")
RUNBOOK_LABEL = 64
"""Characters of a tenant label the runbook prints (a longer stored label is cut)."""


def _initial_of(label: str | None) -> str | None:
    """The label itself when it is a tenant's initial domain (NAME.onmicrosoft.com)."""
    if label and label.lower().endswith(_INITIAL_SUFFIXES) and label.count(".") >= 2:
        return label.lower()
    return None


async def runbook(
    store: Store,
    config: Config,
    name: str,
    *,
    spooler_host: str,
    spooler_ip: str,
    source_initial: str | None = None,
    target_initial: str | None = None,
    fmt: str = "md",
    actor: str = "cli",
) -> str:
    """The tenant-to-tenant runbook of every domain of the migration, both tenants named.

    The stored tenant labels name the tenants; a label that is an initial domain
    (contoso.onmicrosoft.com) also serves as that tenant's initial domain unless one is given.
    """
    migration = await require(store, name)
    await _current(store, migration)  # refuse a migration with no domains (or a gone domain)
    source, target = migration.source_tenant, migration.target_tenant
    return await actions.migration_runbook(
        store,
        config,
        list(migration.domains),
        spooler_host=spooler_host,
        spooler_ip=spooler_ip,
        source_tenant=source[:RUNBOOK_LABEL] if source else None,
        target_tenant=target[:RUNBOOK_LABEL] if target else None,
        source_initial=source_initial or _initial_of(source),
        target_initial=target_initial or _initial_of(target),
        migration=migration.name,
        fmt=fmt,
        actor=actor,
    )


async def release_plan(
    store: Store, config: Config, name: str, *, rate: str | None = None
) -> releaseplan.ReleasePlan:
    """What ``release`` would send, per recipient, with ETAs; changes nothing. The domains
    share one rate when the migration names a target tenant (they share its pacing bucket)."""
    migration = await require(store, name)
    await _current(store, migration)
    _rate(rate)  # the same message as release for a bad --rate
    try:
        return await releaseplan.plan_release(
            store,
            config,
            list(migration.domains),
            rate=rate,
            shared=migration.target_tenant is not None,
        )
    except ValueError as exc:
        raise OperationError(f"--rate: {exc}") from None


# -- views ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DomainView:
    domain: Domain
    status: DomainStatus
    stage: str
    events: list[StageEvent]

    @property
    def eta_s(self) -> float | None:
        """Seconds until what is pending is delivered at the last minute's pace."""
        left = self.status.pending + self.status.delivering
        rate = self.status.delivered_last_minute
        if not left:
            return 0.0
        return left / (rate / 60.0) if rate else None


@dataclass(frozen=True, slots=True)
class MigrationView:
    migration: Migration
    domains: list[DomainView]

    @property
    def totals(self) -> dict[str, int]:
        return {
            key: sum(getattr(view.status, key) for view in self.domains)
            for key in ops.STATUS_COUNTS
        }


async def show(store: Store, name: str, now: float | None = None) -> MigrationView:
    migration = await require(store, name)
    return await view(store, migration, now)


async def view(store: Store, migration: Migration, now: float | None = None) -> MigrationView:
    when = time.time() if now is None else now
    counts = {entry.domain: entry for entry in await store.status(when)}
    events = await store.stage_events(list(migration.domains))
    views = []
    for name in migration.domains:
        domain = await store.get_domain(name)
        if domain is None:
            continue
        status = counts.get(name) or DomainStatus(domain=name, mode=domain.mode)
        views.append(
            DomainView(
                domain,
                status,
                stages.stage(domain, status, events),
                stages.of_domain(name, events),
            )
        )
    return MigrationView(migration, views)


async def list_views(store: Store) -> list[MigrationView]:
    return [await view(store, migration) for migration in await store.list_migrations()]


async def report(store: Store, name: str) -> AsyncIterator[dict[str, Any]]:
    """The reconciliation report over every domain of the migration: one ledger."""
    migration = await require(store, name)
    for domain in migration.domains:
        async for row in ops.report(store, domain):
            yield {"domain": domain, **row}


REPORT_COLUMNS = ("domain", *ops.REPORT_COLUMNS)


def migration_to_dict(migration: Migration) -> dict[str, Any]:
    return {
        "name": migration.name,
        "domains": list(migration.domains),
        "source_tenant": migration.source_tenant,
        "target_tenant": migration.target_tenant,
        "created_at": ops.iso_time(migration.created_at),
        "release_at": ops.iso_time(migration.release_at),
        "release_rate_per_s": migration.release_rate,
    }


def event_to_dict(event: StageEvent) -> dict[str, Any]:
    return {
        "domain": event.domain,
        "stage": event.stage,
        "at": ops.iso_time(event.at),
        "actor": event.actor,
        "detail": event.detail,
        "migration": event.migration,
    }


def view_to_dict(item: MigrationView) -> dict[str, Any]:
    return {
        **migration_to_dict(item.migration),
        "totals": item.totals,
        "domain_details": [
            {
                **ops.domain_to_dict(entry.domain),
                "stage": entry.stage,
                "status": {
                    key: value
                    for key, value in ops.status_entry_to_dict(entry.status).items()
                    if key not in ("domain", "mode")
                },
                "eta_s": None if entry.eta_s is None else round(entry.eta_s),
                "steps": {
                    key: event_to_dict(event)
                    for key, event in stages.steps_confirmed(
                        entry.domain.name, entry.events
                    ).items()
                },
                "events": [event_to_dict(event) for event in entry.events],
            }
            for entry in item.domains
        ],
    }


# -- the serve's part ----------------------------------------------------------------------


async def run_due(store: Store, now: float) -> list[str]:
    """Perform the scheduled releases that are due; the migrations released."""
    done = []
    for migration in await store.list_migrations():
        if migration.release_at is None or migration.release_at > now:
            continue
        try:
            await release_now(
                store,
                migration,
                migration.release_rate,
                actor="schedule",
                scheduled=migration.release_at,
            )
        except Conflict:
            continue  # another node did it, or the operator changed it meanwhile
        except (NotFound, OperationError) as exc:
            # A domain went away: the schedule stays, shown by 'migration show', and the log
            # says why it did not run.
            log.warning("scheduled release of %s not done: %s", migration.name, exc)
            continue
        log.info("scheduled release of %s done", migration.name)
        done.append(migration.name)
    return done


async def advance_stages(store: Store, now: float) -> int:
    """Record ``relaying`` and ``done`` where the counters show them; events recorded."""
    domains = await store.list_domains()
    if not domains:
        return 0
    counts = {entry.domain: entry for entry in await store.status(now)}
    events = await store.stage_events([d.name for d in domains])
    recorded = 0
    for domain in domains:
        status = counts.get(domain.name)
        if status is None or status.total == 0:
            continue
        last = stages.last_stage_event(domain.name, events)
        if last is None:
            continue  # no history: nothing recorded for it (configured before stages)
        probes = 0
        if last.stage in stages.PRE_RELAY:
            rows = await store.list_queue(
                QueueFilter(domain=domain.name, tag=PROBE_TAG), limit=PROBE_COUNT_LIMIT
            )
            probes = len(rows)
        reached = stages.from_counters(last.stage, domain, status, probes)
        if reached is not None:
            await stages.record(
                store, domain.name, [reached], actor="serve", migration=last.migration
            )
            recorded += 1
    return recorded


async def component(config: object, store: Store, domains: object = None) -> None:
    """``service.extra_components`` entry: scheduled releases and stage events, until
    cancelled. A store error is logged and retried at the next tick."""
    while True:
        now = time.time()
        try:
            await run_due(store, now)
            await advance_stages(store, now)
        except StoreError as exc:
            log.warning("migrations: %s (retrying)", exc)
        await asyncio.sleep(TICK)
