"""``mxspool migration ...``: several domains moved between tenants, acted on as one.

A thin shell over :mod:`mxspool.migrate.migration` with the plumbing of every other command
(:mod:`mxspool.cli_support`): each command acts on all the migration's domains at once and is
audited once; the per-domain commands (``domain ...``) stay for exceptions.
"""

from __future__ import annotations

import asyncio
import sys

import click
from rich.console import Console
from rich.table import Table

from mxspool import cli_support as support
from mxspool import operations as ops
from mxspool.evidence.commands import signed_report
from mxspool.migrate import migration as mig
from mxspool.migrate.plan_output import show_release_plan
from mxspool.stage import MANUAL_STEPS, STAGES, steps_confirmed
from mxspool.store.base import Store
from mxspool.units import format_duration

WAIT_INTERVAL = 1.0
"""Seconds between polls of ``migration release --wait``."""


def _rate_text(rate: float | None) -> str:
    if rate is None:
        return "each domain's own"
    return "unpaced" if rate == 0 else f"{rate * 60:g}/min"


@click.group()
@support.config_option
def migration() -> None:
    """Migrations: several domains moved together from a source to a target tenant."""


@migration.command("create")
@support.config_option
@click.argument("name", metavar="NAME")
@click.option("--domain", "domains", multiple=True, required=True, metavar="D", help="Repeatable.")
@click.option("--source-tenant", default=None, metavar="LABEL", help="e.g. contoso.onmicrosoft.com")
@click.option("--target-tenant", default=None, metavar="LABEL", help="Shares pacing by tenant.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def create(
    ctx: click.Context,
    *,
    name: str,
    domains: tuple[str, ...],
    source_tenant: str | None,
    target_tenant: str | None,
    as_json: bool,
) -> None:
    """Make migration NAME of the given domains (each configured, in no other migration)."""
    made = support.run(
        ctx,
        lambda store: mig.create(
            store, name, domains, source_tenant=source_tenant, target_tenant=target_tenant
        ),
    )
    if as_json:
        support.print_json(mig.migration_to_dict(made))
        return
    click.echo(
        f"created migration {made.name}: {', '.join(made.domains)} "
        f"({made.source_tenant or '-'} -> {made.target_tenant or '-'})"
    )


@migration.command("list")
@support.config_option
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_command(ctx: click.Context, as_json: bool) -> None:
    """The migrations, with their domains' counts."""
    views = support.run(ctx, mig.list_views)
    if as_json:
        support.print_json([mig.view_to_dict(item) for item in views])
        return
    if not views:
        click.echo("no migrations yet; 'mxspool migration create NAME --domain D' makes one")
        return
    table = Table("Migration", "Domains", "Source", "Target", "Held", "Pending", "Delivered")
    table.add_column("Parked")
    table.add_column("Release at")
    for item in views:
        totals = item.totals
        m = item.migration
        table.add_row(
            m.name,
            ", ".join(m.domains) or "-",
            support.dash(m.source_tenant),
            support.dash(m.target_tenant),
            str(totals["held"]),
            str(totals["pending"] + totals["delivering"]),
            str(totals["delivered"]),
            str(totals["parked"]),
            support.dash(ops.iso_time(m.release_at)),
        )
    support.console().print(table)


@migration.command("show")
@support.config_option
@click.argument("name", metavar="NAME")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def show(ctx: click.Context, name: str, as_json: bool) -> None:
    """One migration: every domain's stage, counts, ETA and confirmed manual steps."""
    item = support.run(ctx, lambda store: mig.show(store, name))
    if as_json:
        support.print_json(mig.view_to_dict(item))
        return
    m = item.migration
    out = support.console()
    click.echo(f"migration {m.name}: {m.source_tenant or '-'} -> {m.target_tenant or '-'}")
    click.echo(f"release rate: {_rate_text(m.release_rate)}")
    if m.release_at is not None:
        click.echo(
            f"release scheduled at {ops.iso_time(m.release_at)} (a running 'mxspool serve' "
            f"does it; cancel: mxspool migration release {m.name} --cancel)"
        )
    table = Table("Domain", "Stage", "Mode", "Held", "Pending", "Delivered", "Parked", "ETA")
    table.add_column("Steps")
    for entry in item.domains:
        status = entry.status
        eta = entry.eta_s
        steps = steps_confirmed(entry.domain.name, entry.events)
        table.add_row(
            entry.domain.name,
            f"{entry.stage} ({STAGES.index(entry.stage) + 1}/{len(STAGES)})",
            entry.domain.mode.value,
            str(status.held),
            str(status.pending + status.delivering),
            str(status.delivered),
            str(status.parked),
            "-" if eta is None else format_duration(eta),
            " ".join(step for step in MANUAL_STEPS if step in steps) or "-",
        )
    out.print(table)


@migration.command("add-domain")
@support.config_option
@click.argument("name", metavar="NAME")
@click.argument("domains", nargs=-1, required=True, metavar="DOMAIN...")
@click.pass_context
def add_domain(ctx: click.Context, name: str, domains: tuple[str, ...]) -> None:
    """Add configured domains to the migration."""
    made = support.run(ctx, lambda store: mig.change_domains(store, name, add=domains))
    click.echo(f"migration {made.name}: {', '.join(made.domains)}")


@migration.command("remove-domain")
@support.config_option
@click.argument("name", metavar="NAME")
@click.argument("domains", nargs=-1, required=True, metavar="DOMAIN...")
@click.pass_context
def remove_domain(ctx: click.Context, name: str, domains: tuple[str, ...]) -> None:
    """Take domains out of the migration (the domains and their mail stay)."""
    made = support.run(ctx, lambda store: mig.change_domains(store, name, remove=domains))
    click.echo(f"migration {made.name}: {', '.join(made.domains) or 'no domains'}")


@migration.command("hold")
@support.config_option
@click.argument("name", metavar="NAME")
@click.pass_context
def hold(ctx: click.Context, name: str) -> None:
    """Hold every domain of the migration at once (one transaction)."""
    held = support.run(ctx, lambda store: mig.hold(store, name))
    click.echo(
        f"{', '.join(d.name for d in held)} in hold: mail is accepted and kept; "
        f"'mxspool migration release {name}' lets it go"
    )


@migration.command("route")
@support.config_option
@click.argument("name", metavar="NAME")
@support.route_options
@click.pass_context
def route(
    ctx: click.Context,
    *,
    name: str,
    routes: tuple[str, ...],
    use_mx: bool | None,
    tls: str | None,
    profile: str | None,
    max_size: str | None,
    subdomains: bool | None,
    plus_separator: str | None,
    no_plus_addressing: bool,
) -> None:
    """Change where every domain's mail goes (as 'domain route' does, for all at once)."""
    request = ops.RouteRequest(
        list(routes) or None,
        use_mx,
        tls,
        profile,
        max_size,
        subdomains,
        "" if no_plus_addressing else plus_separator,
    )
    updated = support.run(ctx, lambda store: mig.route(store, name, request))
    for item in updated:
        routes_text = ", ".join(str(r) for r in item.routes) or "MX"
        click.echo(f"changed {item.name}: route {routes_text}, tls {item.tls.value}")


@migration.command("release")
@support.config_option
@click.argument("name", metavar="NAME")
@click.option("--rate", default=None, metavar="RATE", help="Pace for the target tenant, 600/min.")
@click.option("--only", default=None, metavar="ADDRESS", help="Release one recipient (canary).")
@click.option("--wait", is_flag=True, help="Show progress until the backlog is delivered.")
@click.option("--at", "at", default=None, metavar="TIME", help="Schedule: ISO 8601 (UTC) or +2h.")
@click.option("--cancel", is_flag=True, help="Cancel the scheduled release.")
@click.option("--dry-run", is_flag=True, help="Show the plan (per recipient, ETA); change nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: the plan as JSON.")
@click.pass_context
def release(
    ctx: click.Context,
    *,
    name: str,
    rate: str | None,
    only: str | None,
    wait: bool,
    at: str | None,
    cancel: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Release every domain at once (one transaction), now or at a time (--at)."""
    if dry_run:
        if only or wait or at or cancel:
            support.fail("--dry-run shows the whole release; give only --rate (and --json)", 2)
        _release_plan(ctx, name, rate, as_json)
        return
    if as_json:
        support.fail("--json goes with --dry-run", 2)
    if wait and (at or cancel):
        support.fail("--wait waits for a release done now; leave it out with --at/--cancel", 2)

    async def action(store: Store) -> mig.ReleaseOutcome:
        outcome = await mig.release(store, name, rate=rate, only=only, at=at, cancel=cancel)
        _print_release(name, outcome)
        if wait and outcome.canary is None:
            await _wait(store, name)
        return outcome

    try:
        support.run(ctx, action)
    except KeyboardInterrupt:
        support.fail(f"stopped waiting; the release of {name} stays in effect", 1)


def _release_plan(ctx: click.Context, name: str, rate: str | None, as_json: bool) -> None:
    config = support.load_config(ctx)
    plan = support.run(ctx, lambda store: mig.release_plan(store, config, name, rate=rate))
    show_release_plan(plan, as_json)


def _print_release(name: str, outcome: mig.ReleaseOutcome) -> None:
    if outcome.cancelled:
        click.echo(f"the scheduled release of {name} is cancelled; its domains stay as they are")
    elif outcome.scheduled_at is not None:
        click.echo(
            f"release of {name} scheduled at {ops.iso_time(outcome.scheduled_at)}, rate "
            f"{_rate_text(outcome.rate)}; a running 'mxspool serve' performs it "
            f"(cancel: mxspool migration release {name} --cancel)"
        )
    elif outcome.canary is not None:
        result = outcome.canary
        click.echo(
            f"released {support.plural(result.released_recipients, 'recipient')} for "
            f"{result.canary}; {result.domain.name} stays in {result.domain.mode.value}"
        )
    else:
        names = ", ".join(d.name for d in outcome.domains)
        click.echo(f"{name} released: {names} relay, rate {_rate_text(outcome.rate)}")


async def _wait(store: Store, name: str) -> None:
    err = Console(stderr=True, highlight=False)
    err.print("waiting for delivery (done by a running 'mxspool serve'); Ctrl-C stops waiting")
    while True:
        item = await mig.show(store, name)
        totals = item.totals
        left = totals["held"] + totals["pending"] + totals["delivering"]
        rate = sum(entry.status.delivered_last_minute for entry in item.domains)
        eta = format_duration(left / (rate / 60.0)) if rate and left else "-"
        err.print(
            f"delivered {totals['delivered']}  parked {totals['parked']}  remaining {left}  "
            f"{rate}/min  ETA {eta}"
        )
        if left == 0:
            break
        await asyncio.sleep(WAIT_INTERVAL)
    click.echo(f"done: {totals['delivered']} delivered, {totals['parked']} parked")


@migration.command("step")
@support.config_option
@click.argument("name", metavar="NAME")
@click.argument("domain", metavar="DOMAIN")
@click.argument("what", metavar="|".join(MANUAL_STEPS), type=click.Choice(MANUAL_STEPS))
@click.option("--note", default="", metavar="TEXT", help="What was done, by whom, a ticket.")
@click.pass_context
def step(ctx: click.Context, name: str, domain: str, what: str, note: str) -> None:
    """Confirm a manual step of the runbook for DOMAIN (shown by show and the checklist)."""
    event = support.run(ctx, lambda store: mig.step(store, name, domain, what, note))
    click.echo(f"{event.domain}: {what} confirmed ({ops.iso_time(event.at)})")


@migration.command("report")
@support.config_option
@click.argument("name", metavar="NAME")
@support.report_options
@click.pass_context
def report(
    ctx: click.Context,
    name: str,
    fmt: str,
    check: bool,
    *,
    sign: bool,
    out_file: str | None,
    key_file: str | None,
) -> None:
    """One reconciliation ledger over every domain of the migration (a domain column first)."""
    if sign:
        found = support.run(ctx, lambda store: mig.require(store, name))
        if not found.domains:
            support.fail(f"migration {found.name} has no domains; nothing to sign", 1)
        total, open_rows = signed_report(
            ctx,
            list(found.domains),
            fmt=fmt,
            check=check,
            out=out_file,
            key_file=key_file,
            migration=found.name,
        )
        support.report_check(check, total, open_rows)
        return
    if out_file or key_file:
        support.fail("--out and --key go with --sign", 2)
    out = sys.stdout
    total, open_rows = support.run(
        ctx,
        lambda store: support.write_report(
            out, mig.report(store, name), mig.REPORT_COLUMNS, fmt=fmt, check=check
        ),
    )
    support.report_check(check, total, open_rows)


@migration.command("runbook")
@support.config_option
@click.argument("name", metavar="NAME")
@click.option("--spooler-host", required=True, metavar="HOST", help="The spooler's MX host name.")
@click.option("--spooler-ip", required=True, metavar="IP", help="Its public IPv4 address.")
@click.option(
    "--source-initial", default=None, metavar="DOMAIN", help="Source's NAME.onmicrosoft.com."
)
@click.option(
    "--target-initial", default=None, metavar="DOMAIN", help="Target's NAME.onmicrosoft.com."
)
@click.option("--format", "fmt", type=click.Choice(["md", "ps1"]), default="md", show_default=True)
@click.pass_context
def runbook(
    ctx: click.Context,
    *,
    name: str,
    spooler_host: str,
    spooler_ip: str,
    source_initial: str | None,
    target_initial: str | None,
    fmt: str,
) -> None:
    """The runbook of the whole move: every domain, both tenants (Markdown or PowerShell).

    The tenants are the migration's labels; a label that is an initial domain
    (NAME.onmicrosoft.com) is used as one unless --source-initial/--target-initial say.
    """
    config = support.load_config(ctx)
    text = support.run(
        ctx,
        lambda store: mig.runbook(
            store,
            config,
            name,
            spooler_host=spooler_host,
            spooler_ip=spooler_ip,
            source_initial=source_initial,
            target_initial=target_initial,
            fmt=fmt,
        ),
    )
    click.echo(text)


@migration.command("remove")
@support.config_option
@click.argument("name", metavar="NAME")
@click.pass_context
def remove(ctx: click.Context, name: str) -> None:
    """Forget the migration; its domains, their mail and their history stay."""
    gone = support.run(ctx, lambda store: mig.remove(store, name))
    click.echo(f"removed migration {gone.name}; its domains stay configured")


def register(group: click.Group) -> None:
    """Add ``migration`` to the ``mxspool`` command group."""
    group.add_command(migration)
