"""Where a domain stands in its migration, from what mxspool knows.

The stages, in order (the operator's story in docs/design.md):

    planned        the domain is configured (or a runbook was made for it)
    mx-to-spooler  `check dns` saw MX at the spooler
    relaying       relay mode and mail (other than probes) came in through the spooler
    holding        in hold: detached from the source tenant, mail accumulating
    released       the hold was released (the backlog drains to the target)
    mx-to-target   after the release, `check dns` saw MX at the domain's route (the target)
    done           MX at the target and every recipient final (delivered, bounced, discarded)

The stage is derived, never stored: from the domain's mode and counts and from the audit log
(``check.dns`` entries record where MX pointed: ``mx=spooler`` / ``mx=route``). A domain that
goes back (held again after a release) shows its current stage, not its best one.
"""

from __future__ import annotations

from collections.abc import Sequence

from mxspool.store.base import AuditEntry, Domain, DomainMode, DomainStatus

STAGES = ("planned", "mx-to-spooler", "relaying", "holding", "released", "mx-to-target", "done")


def _mine(domain: str, audit: Sequence[AuditEntry]) -> list[AuditEntry]:
    return sorted((entry for entry in audit if entry.target == domain), key=lambda e: e.at)


def mx_seen(entries: Sequence[AuditEntry], where: str, after: float = 0.0) -> AuditEntry | None:
    """The last ``check dns`` entry at or after ``after`` that saw MX at ``where``."""
    found = None
    for entry in entries:
        if entry.action == "check.dns" and entry.at >= after and f"mx={where}" in entry.detail:
            found = entry
    return found


def hold_started(domain: Domain, entries: Sequence[AuditEntry]) -> float | None:
    """When the domain was last put in hold (None: never)."""
    at = None
    for entry in entries:
        if entry.action == "domain.hold" or (
            entry.action == "domain.add" and "mode=hold" in entry.detail
        ):
            at = entry.at
    if at is None and domain.mode is DomainMode.HOLD:
        at = domain.created_at
    return at


def released_at(domain: Domain, entries: Sequence[AuditEntry]) -> float | None:
    """When the hold was last released as a whole (not a canary); None while held."""
    if domain.mode is DomainMode.HOLD:
        return None
    at = None
    for entry in entries:
        if entry.action == "domain.release" and "was=hold" in entry.detail:
            at = entry.at
    return at if at is not None else domain.released_at


def stage(domain: Domain, status: DomainStatus, audit: Sequence[AuditEntry]) -> str:
    """The domain's current stage (one of STAGES)."""
    entries = _mine(domain.name, audit)
    total = status.total
    open_count = status.unfinished
    released = released_at(domain, entries)
    if released is not None:
        if mx_seen(entries, "route", after=released) is not None:
            return "done" if open_count == 0 else "mx-to-target"
        return "released"
    if domain.mode is DomainMode.HOLD:
        return "holding"
    at_spooler = mx_seen(entries, "spooler") is not None
    # Probes (one recipient each) come through the spooler before the cut-over too: only other
    # mail shows that MX points here.
    probes = sum(1 for entry in entries if entry.action == "probe")
    if total - probes > 0:
        return "relaying"
    if at_spooler:
        return "mx-to-spooler"
    return "planned"
