"""A release plan on the terminal: the one display of ``domain release --dry-run`` and
``migration release --dry-run``.

Both commands show the same plan (:mod:`mxspool.migrate.releaseplan`) the same way, so the
table lives here, beside the command modules, rather than in either of them.
"""

from __future__ import annotations

import click
from rich.table import Table

from mxspool.cli_support import console, plural, print_json
from mxspool.migrate.releaseplan import (
    STALE_AFTER,
    RecipientPlan,
    ReleasePlan,
    check_age,
    plan_to_dict,
)
from mxspool.units import format_duration

PLAN_ROWS = 50
"""Recipients a release plan's table shows per domain (the slowest); --json gives them all."""


def _readiness_text(row: RecipientPlan, now: float) -> str:
    """The readiness and the check's age: ``ready, 5m ago``, ``not ready, STALE 1.1d ago``."""
    age = check_age(row, now)
    if age is None:
        return row.readiness
    return f"{row.readiness}, {'STALE ' if row.stale else ''}{format_duration(age)} ago"


def show_release_plan(plan: ReleasePlan, as_json: bool) -> None:
    """``--dry-run``'s output: the plan as JSON (``--json``), else as tables."""
    if as_json:
        print_json(plan_to_dict(plan))
        return
    print_release_plan(plan)


def print_release_plan(plan: ReleasePlan) -> None:
    """A release plan (``domain release --dry-run``, ``migration release --dry-run``): per
    domain a table of its slowest recipients and its ETA; with several domains, the overall."""
    for item in plan.domains:
        limit = item.per_recipient_hourly_limit
        rate = "unpaced" if item.rate == 0 else f"{item.rate * 60:g}/min"
        click.echo(
            f"{item.domain} ({item.mode}): {plural(item.messages, 'message')} to release, "
            f"{item.size:,} bytes, rate {rate}, per-recipient limit "
            f"{f'{limit:,}/h' if limit else 'none'}"
        )
        table = Table("Recipient", "Messages", "Bytes", "Too big", "Held", "Ready", "ETA")
        for row in item.recipients[:PLAN_ROWS]:
            table.add_row(
                row.address,
                str(row.messages),
                f"{row.size:,}",
                str(row.too_big),
                str(row.held),
                _readiness_text(row, plan.at),
                format_duration(row.eta_s),
            )
        console().print(table)
        more = len(item.recipients) - PLAN_ROWS
        if more > 0:
            click.echo(f"... and {plural(more, 'more recipient')} (--json lists them all)")
        not_ready = sum(1 for row in item.recipients if row.readiness == "not ready")
        if not_ready:
            click.echo(
                f"{plural(not_ready, 'recipient')} not ready at the last 'mxspool check "
                f"recipients {item.domain}': create the mailboxes at the target, or hold them "
                "('mxspool hold --recipient ADDRESS')",
                err=True,
            )
        if any(row.stale for row in item.recipients):
            click.echo(
                f"readiness older than {format_duration(STALE_AFTER)} is stale: run "
                f"'mxspool check recipients {item.domain}' again",
                err=True,
            )
        if item.too_big:
            click.echo(
                f"{plural(item.too_big, 'message')} exceed the mailbox's size limit and will "
                "park; raise MaxReceiveSize at the target first",
                err=True,
            )
        click.echo(
            f"ETA at the rate {format_duration(item.rate_eta_s)}, slowest mailbox "
            f"{format_duration(item.recipient_eta_s)}: about {format_duration(item.eta_s)}"
        )
    if len(plan.domains) > 1:
        shared = " (one rate shared by the target tenant)" if plan.shared else ""
        click.echo(
            f"overall: {plural(plan.messages, 'message')} in {plural(len(plan.domains), 'domain')}"
            f"{shared}, about {format_duration(plan.eta_s)} (the slowest, not the sum)"
        )
