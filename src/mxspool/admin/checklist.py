"""The migration checklist of one domain: the operator's story (docs/design.md), with progress.

Each step is judged from what mxspool knows: the domain's state and counts, its stage events
(``mxspool.stage``: hold, release, where ``check dns`` saw MX, the manual steps the engineer
confirmed with ``migration step``) and the audit log for actions that are not stages (runbook,
checks, re-route, canary). Steps mxspool cannot see are shown as "not tracked" rather than
guessed, with the command that helps. The first line is the domain's migration stage, the same
as ``status`` shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mxspool.stage import STAGES, of_domain, stage, steps_confirmed
from mxspool.store.base import AuditEntry, Domain, DomainMode, DomainStatus, StageEvent


@dataclass(frozen=True, slots=True)
class Step:
    key: str
    title: str
    done: bool | None
    """True done, False not yet, None not tracked by mxspool."""
    detail: str
    command: str


def _first(entries: Sequence[AuditEntry], action: str, *, after: float = 0.0) -> AuditEntry | None:
    for entry in entries:
        if entry.action == action and entry.at >= after:
            return entry
    return None


def _by(entry: AuditEntry | None) -> str:
    return "" if entry is None else f"by {entry.actor}"


def _event(events: Sequence[StageEvent], name: str) -> StageEvent | None:
    """The last event of stage ``name``."""
    found = None
    for event in events:
        if event.stage == name:
            found = event
    return found


def _who(event: StageEvent | None) -> str:
    return "" if event is None else f"by {event.actor}"


def checklist(
    domain: Domain,
    status: DomainStatus,
    audit: Sequence[AuditEntry],
    events: Sequence[StageEvent] = (),
) -> list[Step]:
    """The steps for ``domain``; ``audit`` and ``events`` may hold others' (ignored)."""
    name = domain.name
    mine = sorted((entry for entry in audit if entry.target == name), key=lambda e: e.at)
    own = of_domain(name, events)
    total = status.total
    open_count = status.unfinished

    added = _first(mine, "domain.add")
    checks = [entry for entry in mine if entry.action.startswith(("check.", "probe"))]
    hold = _event(own, "holding")
    held_now = domain.mode is DomainMode.HOLD
    after_hold = hold.at if hold is not None else float("inf")
    rerouted = _first(mine, "domain.route", after=after_hold)
    rerouted = rerouted or _first(mine, "migration.route", after=after_hold)
    releases = [e for e in mine if e.action == "domain.release" and e.at >= after_hold]
    canary = next((e for e in releases if "only=" in e.detail), None)
    full = _event(own, "released")
    released = full is not None or (not held_now and domain.released_at is not None)
    planned = _first(mine, "runbook")
    mx_spooler = _event(own, "mx-to-spooler")
    mx_target = _event(own, "mx-to-target")
    current = stage(domain, status, events)
    position = STAGES.index(current) + 1
    manual = steps_confirmed(name, own)

    def confirmed(step: str, title: str, hint: str) -> Step:
        event = manual.get(step)
        return Step(
            step,
            title,
            event is not None,
            f"confirmed {_who(event)}" + (f": {event.detail}" if event and event.detail else "")
            if event is not None
            else "not confirmed yet",
            hint,
        )

    return [
        Step(
            "stage",
            f"Stage: {current} ({position} of {len(STAGES)})",
            True,
            " → ".join(STAGES),
            f"mxspool status; mxspool check dns {name}",
        ),
        Step(
            "plan",
            "Plan: lower the MX TTL, prepare connectors and the runbook",
            True if planned is not None else None,
            f"runbook made {_by(planned)}: {planned.detail}"
            if planned is not None
            else "no runbook made with mxspool",
            f"mxspool runbook {name} --spooler-host HOST --spooler-ip IP",
        ),
        Step(
            "configure",
            "Configure the domain with today's route",
            True,
            f"added {_by(added)}; routes {', '.join(str(r) for r in domain.routes) or '-'}"
            + (" (MX)" if domain.use_mx else ""),
            f"mxspool domain add {name} --route HOST[:PORT]",
        ),
        Step(
            "check",
            "Check: preflight (MX, TTL, MTA-STS, route with TLS) and an end-to-end probe",
            True if checks else None,
            f"{len(checks)} check(s) recorded" if checks else "no check recorded yet",
            f"mxspool check dns {name}; mxspool check route {name}; mxspool probe {name}",
        ),
        Step(
            "cutover",
            "Cut over MX to the spooler in relay mode",
            total > 0 or mx_spooler is not None,
            ("'check dns' saw MX at the spooler; " if mx_spooler is not None else "")
            + (
                f"{total} recipient(s) received through mxspool so far"
                if total
                else "no mail received for the domain yet"
            ),
            f"point the domain's MX record at the spooler; mxspool check dns {name}",
        ),
        Step(
            "hold",
            "Hold: the domain is detached from the source tenant; mail accumulates",
            hold is not None or held_now,
            (f"held {_who(hold)}" if hold is not None else "in hold")
            + (f"; {status.held} recipient(s) held now" if held_now else ""),
            f"mxspool domain hold {name} (or mxspool migration hold NAME)",
        ),
        confirmed(
            "detached",
            "Detach the domain from the source tenant",
            f"mxspool migration step NAME {name} detached --note TEXT",
        ),
        confirmed(
            "attached",
            "Add the domain to the target tenant",
            f"mxspool migration step NAME {name} attached",
        ),
        confirmed(
            "verified",
            "Verify the domain in the target tenant",
            f"mxspool migration step NAME {name} verified",
        ),
        Step(
            "reroute",
            "Re-route to the target tenant and check readiness",
            rerouted is not None or released,
            f"routes now {', '.join(str(r) for r in domain.routes) or 'MX'} {_by(rerouted)}",
            f"mxspool domain route {name} --route TARGET; mxspool check recipients {name}",
        ),
        Step(
            "canary",
            "Canary: release one recipient and check the target's mailbox",
            True if canary is not None else (None if released else False),
            canary.detail if canary is not None else "no canary release recorded",
            f"mxspool domain release {name} --only user@{name}",
        ),
        Step(
            "release",
            "Release the backlog, paced to what the target accepts",
            released,
            (
                f"released {_who(full)}; {status.pending + status.delivering} still to deliver"
                if released
                else f"{status.held} recipient(s) waiting"
            ),
            f"mxspool domain release {name} --rate 600/min",
        ),
        Step(
            "mx-target",
            "Point MX at the target; keep relaying until old TTLs expire",
            mx_target is not None,
            "'check dns' saw MX at the target after the release"
            if mx_target is not None
            else "MX not seen at the target yet",
            f"change the MX record; mxspool check dns {name}",
        ),
        Step(
            "finish",
            "Reconcile: every recipient delivered or otherwise final",
            released and open_count == 0,
            "everything is delivered or otherwise final"
            if released and open_count == 0
            else f"{open_count} recipient(s) not final yet",
            f"mxspool report --domain {name} --check",
        ),
    ]
