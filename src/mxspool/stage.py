"""Where a domain stands in its migration: typed events recorded when the actions happen.

The stages, in order (the operator's story in docs/design.md):

    planned        the domain was added (``domain add``, ``migration create``)
    mx-to-spooler  `check dns` saw MX at the spooler
    relaying       relay mode and mail (other than probes) came in through the spooler
    holding        in hold: detached from the source tenant, mail accumulating
    released       the hold was released (the backlog drains to the target)
    mx-to-target   after the release, `check dns` saw MX at the domain's route (the target)
    done           MX at the target and every recipient final (delivered, bounced, discarded)

Each is a ``StageEvent`` row written by the action itself (``operations`` for add, hold and
release, ``migrate.actions`` for ``check dns``, the serve's background task for ``relaying``
and ``done``, which come from counters, so the intake never writes per message). The current
stage is the last event's, so a domain that goes back (held again after a release) shows where
it is now, not its best. Beside the stages, the manual steps the runbook asks the engineer to
confirm (``MANUAL_STEPS``: detached from the source tenant, attached to and verified in the
target) are events too; they do not move the stage. This module is the one home of the rules:
``status``, the checklist and the migration views all read stages through it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from mxspool.store.base import Domain, DomainMode, DomainStatus, StageEvent, Store

STAGES = ("planned", "mx-to-spooler", "relaying", "holding", "released", "mx-to-target", "done")

MANUAL_STEPS = ("detached", "attached", "verified")
"""Confirmed by the engineer (``migration step``): the domain was detached from the source
tenant, attached to the target tenant, verified there."""

PRE_RELAY = ("planned", "mx-to-spooler")
"""Stages from which the first real mail makes the domain ``relaying``."""


def of_domain(domain: str, events: Sequence[StageEvent]) -> list[StageEvent]:
    """The domain's events (stages and manual steps), oldest first."""
    return [event for event in events if event.domain == domain]


def last_stage_event(domain: str, events: Sequence[StageEvent]) -> StageEvent | None:
    found = None
    for event in events:
        if event.domain == domain and event.stage in STAGES:
            found = event
    return found


def stage(domain: Domain, status: DomainStatus, events: Sequence[StageEvent]) -> str:
    """The domain's current stage (one of STAGES); ``events`` may hold other domains' too."""
    last = last_stage_event(domain.name, events)
    if last is None:
        # Configured before stages were recorded: what the domain's mode says.
        if domain.mode is DomainMode.HOLD:
            return "holding"
        return "released" if domain.released_at is not None else "planned"
    if last.stage in ("mx-to-target", "done"):
        # Final once nothing is left; new mail after "done" reopens it until delivered.
        return "done" if status.unfinished == 0 else "mx-to-target"
    return last.stage


def steps_confirmed(domain: str, events: Sequence[StageEvent]) -> dict[str, StageEvent]:
    """The manual steps confirmed for the domain: the last confirmation of each."""
    return {
        event.stage: event
        for event in events
        if event.domain == domain and event.stage in MANUAL_STEPS
    }


def after_dns_check(current: str, mx_at: str, status: DomainStatus) -> list[str]:
    """The stages a ``check dns`` result moves the domain to (``mx_at``: spooler, route...)."""
    if mx_at == "spooler" and current == "planned":
        return ["mx-to-spooler"]
    if mx_at == "route" and current == "released":
        return ["mx-to-target", *(["done"] if status.unfinished == 0 else [])]
    return []


def from_counters(current: str, domain: Domain, status: DomainStatus, probes: int) -> str | None:
    """The stage the counters show the domain reached, if its last event is behind: real mail
    (not probes) relayed makes it ``relaying``; nothing left after MX moved makes it ``done``."""
    if current in PRE_RELAY and domain.mode is DomainMode.RELAY and status.total > probes:
        return "relaying"
    if current == "mx-to-target" and status.unfinished == 0:
        return "done"
    return None


async def migration_of(store: Store, domain: str) -> str | None:
    """The migration the domain belongs to, if any."""
    for migration in await store.list_migrations():
        if domain in migration.domains:
            return migration.name
    return None


async def record(
    store: Store,
    domain: str,
    stages: Sequence[str],
    *,
    actor: str,
    detail: str = "",
    migration: str | None = None,
    at: float | None = None,
) -> None:
    """Record that ``domain`` reached ``stages`` (in order), naming its migration."""
    if not stages:
        return
    name = migration if migration is not None else await migration_of(store, domain)
    when = time.time() if at is None else at
    await store.record_stage_events(
        [StageEvent(domain, item, when, actor, detail, name) for item in stages]
    )
