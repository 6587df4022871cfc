"""The ``mxspool`` command: a thin shell over :mod:`mxspool.operations`.

Each management command loads the configuration, opens the store, calls one operation, renders
its result (rich tables for people, ``--json`` for scripts) and closes the store; it works
whether or not a server runs, because the server re-reads the store within a second.

Exit status: 0 success, 1 the operation failed (not found, conflict, store error), 2 usage or
configuration error. Errors go to stderr and say what to do next.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mxspool import operations as ops
from mxspool.cli_support import (
    MAX_SIZE_HELP,
    PLUS_HELP,
    config_option,
    console,
    dash,
    fail,
    load_config,
    plural,
    print_json,
    report_check,
    report_options,
    route_options,
    run,
    write_report,
)
from mxspool.evidence.commands import register as register_evidence_commands
from mxspool.evidence.commands import signed_report
from mxspool.maintenance import register as register_maintenance_commands
from mxspool.migrate import releaseplan
from mxspool.migrate.commands import register as register_migration_commands
from mxspool.migrate.migration_commands import register as register_migration_group
from mxspool.migrate.plan_output import show_release_plan
from mxspool.notify.commands import register as register_notify_commands
from mxspool.store.base import (
    QUEUE_STATES,
    Conflict,
    Domain,
    QueueFilter,
    RecipientHold,
    Store,
)
from mxspool.tls.commands import register as register_tls_commands
from mxspool.units import format_duration

WAIT_INTERVAL = 1.0
"""Seconds between polls of ``domain release --wait``."""


# -- table cells -----------------------------------------------------------------------------


def _rate_text(rate: float | None) -> str:
    if rate is None:
        return "default"
    if rate == 0:
        return "unpaced"
    return f"{rate * 60:g}/min"


def _routing_text(domain: Domain) -> str:
    routes = ", ".join(str(route) for route in domain.routes)
    if domain.use_mx:
        return f"MX of {routes}" if routes else f"MX of {domain.name}"
    return routes


# -- the command group ---------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.version_option(package_name="mxspool")
def cli() -> None:
    """mxspool: hold a domain's mail during a migration, then release it, paced."""


@cli.command()
@config_option
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run the SMTP intake, the delivery engine and the admin API until SIGTERM/SIGINT."""
    config = load_config(ctx)
    # Imported here so management commands never pay for the server's imports.
    from mxspool.service import serve as run_server

    ctx.exit(run_server(config))


@cli.command("init")
@click.argument("directory", metavar="[DIR]", default=".", type=click.Path(file_okay=False))
@click.option(
    "--self-signed", "self_signed", metavar="HOSTNAME", help="Also make a TLS certificate."
)
@click.option("--data-dir", metavar="DIR", type=click.Path(file_okay=False), help="Spool dir.")
def init_command(directory: str, self_signed: str | None, data_dir: str | None) -> None:
    """Write a commented starter mxspool.toml and an admin token into DIR (default: here)."""
    from pathlib import Path

    from mxspool import starter

    try:
        written = starter.init(
            Path(directory), self_signed=self_signed, data_dir=Path(data_dir) if data_dir else None
        )
    except starter.InitError as exc:
        fail(str(exc), 1)
    click.echo(starter.next_steps(written, str(written.config)))


# -- domain --------------------------------------------------------------------------------


@cli.group()
@config_option
def domain() -> None:
    """Configure the domains mxspool accepts mail for."""


def _print_domain_line(verb: str, item: Domain) -> None:
    click.echo(
        f"{verb} {item.name}: mode {item.mode.value}, route {_routing_text(item)}, "
        f"tls {item.tls.value}, rate {_rate_text(item.rate)}"
        + (f", profile {item.profile}" if item.profile else "")
    )


@domain.command("add")
@config_option
@click.argument("name", metavar="DOMAIN")
@click.option("--route", "routes", multiple=True, metavar="HOST[:PORT]", help="Destination.")
@click.option("--mx", "use_mx", is_flag=True, help="Route by MX records.")
@click.option("--tls", default="verify", show_default=True, metavar="MODE")
@click.option("--hold", is_flag=True, help="Keep mail instead of relaying it.")
@click.option("--profile", default=None, metavar="NAME", help="e.g. exchange-online.")
@click.option("--max-size", default=None, metavar="SIZE", help=MAX_SIZE_HELP)
@click.option("--subdomains", is_flag=True, help="Accept its subdomains too, routed alike.")
@click.option("--plus-separator", default="+", show_default=True, metavar="C", help=PLUS_HELP)
@click.option("--no-plus-addressing", is_flag=True, help="local+tag@ is refused unless listed.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def domain_add(
    ctx: click.Context,
    *,
    name: str,
    routes: tuple[str, ...],
    use_mx: bool,
    tls: str,
    hold: bool,
    profile: str | None,
    max_size: str | None,
    subdomains: bool,
    plus_separator: str,
    no_plus_addressing: bool,
    as_json: bool,
) -> None:
    """Accept mail for DOMAIN and deliver it to the given routes (or keep it, with --hold)."""
    added = run(
        ctx,
        lambda store: ops.add_domain(
            store,
            name,
            list(routes),
            use_mx=use_mx,
            tls=tls,
            hold=hold,
            profile=profile,
            max_size=max_size,
            subdomains=subdomains,
            plus_separator="" if no_plus_addressing else plus_separator,
        ),
    )
    if as_json:
        print_json(ops.domain_to_dict(added))
    else:
        _print_domain_line("added", added)


@domain.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def domain_list(ctx: click.Context, as_json: bool) -> None:
    """The configured domains."""
    domains = run(ctx, ops.list_domains)
    if as_json:
        print_json([ops.domain_to_dict(item) for item in domains])
        return
    if not domains:
        click.echo("no domains yet; add one with 'mxspool domain add DOMAIN --route HOST'")
        return
    table = Table("Domain", "Mode", "Route", "TLS", "Rate", "Profile", "Released")
    for item in domains:
        table.add_row(
            item.name,
            item.mode.value,
            _routing_text(item),
            item.tls.value,
            _rate_text(item.rate),
            dash(item.profile),
            dash(ops.iso_time(item.released_at)),
        )
    console().print(table)


@domain.command("show")
@config_option
@click.argument("name", metavar="DOMAIN")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def domain_show(ctx: click.Context, name: str, as_json: bool) -> None:
    """One domain's configuration and its mail counts."""

    async def action(store: Store) -> tuple[ops.DomainDetail, list[RecipientHold]]:
        detail = await ops.show_domain(store, name)
        return detail, await ops.recipient_holds(store, detail.domain.name)

    detail, holds = run(ctx, action)
    if as_json:
        data = ops.domain_detail_to_dict(detail)
        data["recipient_holds"] = [ops.recipient_hold_to_dict(item) for item in holds]
        print_json(data)
        return
    item, status = detail.domain, detail.status
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("domain", item.name),
        ("mode", item.mode.value),
        ("route", _routing_text(item)),
        ("tls", item.tls.value),
        ("rate", _rate_text(item.rate)),
        ("profile", dash(item.profile)),
        ("created", dash(ops.iso_time(item.created_at))),
        ("released", dash(ops.iso_time(item.released_at))),
    ]
    rows += [(key, str(getattr(status, key))) for key in ops.STATUS_COUNTS]
    oldest = status.oldest_pending_age_s
    rows.append(("oldest pending", "-" if oldest is None else format_duration(oldest)))
    rows.append(("delivered/min", str(status.delivered_last_minute)))
    for hold in holds:  # hold --recipient: kept while the domain is released
        rows.append(("recipient hold", f"{hold.address} ({plural(hold.held, 'message')} held)"))
    for key, value in rows:
        table.add_row(key, value)
    console().print(table)


@domain.command("route")
@config_option
@click.argument("name", metavar="DOMAIN")
@route_options
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def domain_route(
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
    as_json: bool,
) -> None:
    """Change where DOMAIN's mail goes (the routes given replace the current ones)."""
    updated = run(
        ctx,
        lambda store: ops.route_domain(
            store,
            name,
            list(routes) or None,
            use_mx=use_mx,
            tls=tls,
            profile=profile,
            max_size=max_size,
            subdomains=subdomains,
            plus_separator="" if no_plus_addressing else plus_separator,
        ),
    )
    if as_json:
        print_json(ops.domain_to_dict(updated))
    else:
        _print_domain_line("changed", updated)


@domain.command("hold")
@config_option
@click.argument("name", metavar="DOMAIN")
@click.pass_context
def domain_hold(ctx: click.Context, name: str) -> None:
    """Keep DOMAIN's mail (accept and store it, deliver nothing) until released."""
    held = run(ctx, lambda store: ops.hold_domain(store, name))
    click.echo(
        f"{held.name} is in hold: mail is accepted and kept; "
        f"'mxspool domain release {held.name}' lets it go"
    )


@domain.command("release")
@config_option
@click.argument("name", metavar="DOMAIN")
@click.option("--rate", default=None, metavar="RATE", help="Pace, e.g. 600/min.")
@click.option("--only", default=None, metavar="ADDRESS", help="Release one recipient (canary).")
@click.option("--wait", is_flag=True, help="Show progress until the backlog is delivered.")
@click.option("--dry-run", is_flag=True, help="Show the plan (per recipient, ETA); change nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: the plan as JSON.")
@click.pass_context
def domain_release(
    ctx: click.Context,
    name: str,
    *,
    rate: str | None,
    only: str | None,
    wait: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Deliver DOMAIN's held mail, oldest first (or only one recipient's, with --only)."""
    if dry_run:
        _release_plan(ctx, ops.normalize_domain(name), rate, as_json)
        return

    async def action(store: Store) -> ops.ReleaseResult:
        result = await ops.release_domain(store, name, rate=rate, only=only)
        _print_release(result)
        if wait:
            await _wait_for_drain(store, result)
        return result

    try:
        run(ctx, action)
    except KeyboardInterrupt:
        # Only the waiting stops: the release was committed before the wait began.
        fail(
            f"stopped waiting; the release of {name} stays in effect ('mxspool status' follows it)",
            1,
        )


def _release_plan(ctx: click.Context, name: str, rate: str | None, as_json: bool) -> None:
    config = load_config(ctx)

    async def action(store: Store) -> releaseplan.ReleasePlan:
        try:
            return await releaseplan.plan_release(store, config, [name], rate=rate)
        except ValueError as exc:
            raise ops.OperationError(str(exc)) from None

    show_release_plan(run(ctx, action), as_json)


def _print_release(result: ops.ReleaseResult) -> None:
    item = result.domain
    if result.canary is not None:
        click.echo(
            f"released {plural(result.released_recipients, 'recipient')} for {result.canary}; "
            f"{item.name} stays in {item.mode.value}"
        )
        if result.released_recipients == 0:
            click.echo(
                f"nothing was waiting for {result.canary}; 'mxspool queue list --domain "
                f"{item.name}' shows what is queued",
                err=True,
            )
        return
    click.echo(f"{item.name} released: mode {item.mode.value}, rate {_rate_text(item.rate)}")


async def _drain_counts(store: Store, result: ops.ReleaseResult) -> dict[str, float]:
    """Counts the --wait display needs: delivered, parked, remaining, per-minute rate."""
    name = result.domain.name
    if result.canary is None:
        status = (await ops.show_domain(store, name)).status
        return {
            "delivered": status.delivered,
            "parked": status.parked,
            "remaining": status.held + status.pending + status.delivering,
            "rate": status.delivered_last_minute,
        }
    # A canary is a handful of rows: count that address's rows straight from the queue.
    counts = {"delivered": 0.0, "parked": 0.0, "remaining": 0.0, "rate": 0.0}
    after: int | None = None
    while True:
        canary = QueueFilter(domain=name, search=result.canary)
        page = await ops.queue_list(store, canary, limit=1000, after=after)
        for entry in page:
            if entry.rcpt.lower() != result.canary.lower():
                continue
            if entry.state in ("pending", "delivering"):
                counts["remaining"] += 1
            elif entry.state in ("delivered", "parked"):
                counts[entry.state] += 1
        if len(page) < 1000:
            return counts
        after = page[-1].recipient_id


async def _wait_for_drain(store: Store, result: ops.ReleaseResult) -> None:
    err = Console(stderr=True, highlight=False)
    err.print(
        "waiting for delivery (done by a running 'mxspool serve'); Ctrl-C stops waiting, "
        "the release stays in effect"
    )
    first = await _drain_counts(store, result)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err) as progress:
        task = progress.add_task(result.canary or result.domain.name, total=None, info="")
        counts = first
        while True:
            done = (counts["delivered"] - first["delivered"]) + (counts["parked"] - first["parked"])
            remaining = counts["remaining"]
            rate = counts["rate"]
            eta = format_duration(remaining / (rate / 60.0)) if rate and remaining else "-"
            info = (
                f"delivered {counts['delivered']:.0f}  parked {counts['parked']:.0f}  "
                f"remaining {remaining:.0f}  {rate:.0f}/min  ETA {eta}"
            )
            progress.update(task, total=max(done + remaining, 1), completed=done, info=info)
            if remaining == 0:
                break
            await asyncio.sleep(WAIT_INTERVAL)
            counts = await _drain_counts(store, result)
    click.echo(
        f"done: {counts['delivered']:.0f} delivered, {counts['parked']:.0f} parked, "
        "nothing left to send"
    )
    if counts["parked"]:
        click.echo(
            f"parked mail needs a decision: 'mxspool queue list --domain {result.domain.name} "
            "--state parked', then 'mxspool queue retry --parked' or discard",
            err=True,
        )


@domain.command("remove")
@config_option
@click.argument("name", metavar="DOMAIN")
@click.option("--force", is_flag=True, help="Remove even while mail is not delivered.")
@click.pass_context
def domain_remove(ctx: click.Context, name: str, force: bool) -> None:
    """Stop accepting mail for DOMAIN (refused while mail is pending, unless --force)."""

    async def action(store: Store) -> None:
        try:
            await ops.remove_domain(store, name, force=force)
        except Conflict as exc:
            text = str(exc)
            if "--force" not in text:
                text += "; use --force to remove it anyway"
            raise Conflict(text) from None

    run(ctx, action)
    click.echo(f"removed {ops.normalize_domain(name)}; its mail is no longer accepted")


# -- queue ---------------------------------------------------------------------------------


@cli.group()
@config_option
def queue() -> None:
    """Look at and act on stored messages."""


@queue.command("list")
@config_option
@click.option("--domain", default=None, metavar="D")
@click.option("--state", default=None, metavar="S", help=", ".join(QUEUE_STATES))
@click.option("--limit", default=100, show_default=True, type=int)
@click.option("--after", default=None, type=int, metavar="RID", help="Continue after this row.")
@click.option("--search", default=None, metavar="TEXT", help="Match rcpt, sender, Message-ID.")
@click.option("--tag", default=None, metavar="TAG", help="Only tagged messages, e.g. probe.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def queue_list(
    ctx: click.Context,
    *,
    domain: str | None,
    state: str | None,
    limit: int,
    after: int | None,
    search: str | None,
    tag: str | None,
    as_json: bool,
) -> None:
    """Recipients in the queue, oldest first."""
    entries = run(
        ctx,
        lambda store: ops.queue_list(
            store,
            QueueFilter(domain=domain, state=state, search=search, tag=tag),
            limit=limit,
            after=after,
        ),
    )
    if as_json:
        print_json([ops.queue_entry_to_dict(entry) for entry in entries])
        return
    if not entries:
        click.echo("nothing queued matches")
        return
    table = Table("ID", "Recipient", "State", "Tries", "Size", "Received", "Last reply")
    for entry in entries:
        table.add_row(
            entry.message_id,
            entry.rcpt,
            entry.state,
            str(entry.attempts),
            str(entry.size),
            dash(ops.iso_time(entry.received_at)),
            dash(entry.last_reply),
        )
    console().print(table)
    if len(entries) == limit:
        click.echo(
            f"showing the first {limit}; more with --after {entries[-1].recipient_id}", err=True
        )


@queue.command("show")
@config_option
@click.argument("message_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def queue_show(ctx: click.Context, message_id: str, as_json: bool) -> None:
    """One message: envelope, client, recipients and delivery attempts."""
    detail = run(ctx, lambda store: ops.queue_show(store, message_id))
    data = ops.message_detail_to_dict(detail)
    if as_json:
        print_json(data)
        return
    out = console()
    info = Table(show_header=False, box=None)
    info.add_column(style="bold")
    info.add_column()
    client = data["client"]
    params = {key: value for key, value in data["mail_params"].items() if value}
    for key, value in (
        ("id", data["id"]),
        ("message-id", data["message_id"]),
        ("received", data["received_at"]),
        ("from", f"<{data['mail_from']}>"),
        ("parameters", " ".join(f"{k}={v}" for k, v in params.items())),
        ("size", data["size"]),
        ("sha256", data["sha256"]),
        ("client", f"{client['helo']} [{client['address']}] {client['tls_version'] or ''}"),
        ("tags", ", ".join(data["tags"])),
    ):
        info.add_row(key, dash(value))
    out.print(info)
    recipients = Table("Recipient", "State", "Tries", "Delivered", "Last reply")
    for rcpt in data["recipients"]:
        recipients.add_row(
            rcpt["rcpt"],
            rcpt["state"],
            str(rcpt["attempts"]),
            dash(rcpt["delivered_at"]),
            dash(rcpt["last_reply"]),
        )
    out.print(recipients)
    if data["attempts"]:
        attempts = Table("At", "Recipient", "Destination", "Outcome", "Reply")
        for attempt in data["attempts"]:
            attempts.add_row(
                attempt["at"],
                attempt["rcpt"],
                attempt["destination"],
                attempt["outcome"],
                attempt["reply"],
            )
        out.print(attempts)


@queue.command("export")
@config_option
@click.argument("message_id", metavar="ID")
@click.pass_context
def queue_export(ctx: click.Context, message_id: str) -> None:
    """Write the message, exactly as stored, to stdout."""
    # Raw bytes: a text stream would translate newlines or fail on 8-bit content.
    out = sys.stdout.buffer

    async def action(store: Store) -> None:
        async for piece in ops.queue_export(store, message_id):
            out.write(piece)
        out.flush()

    run(ctx, action)


@queue.command("retry")
@config_option
@click.argument("message_id", metavar="ID", required=False)
@click.option("--parked", is_flag=True, help="Every parked recipient (of --domain).")
@click.option("--domain", default=None, metavar="D")
@click.pass_context
def queue_retry(
    ctx: click.Context, message_id: str | None, parked: bool, domain: str | None
) -> None:
    """Put parked recipients back in the queue for another attempt."""
    count = run(
        ctx,
        lambda store: ops.queue_retry(store, message_id, parked=parked, domain=domain),
    )
    click.echo(f"{plural(count, 'recipient')} back in the queue")


@queue.command("flush")
@config_option
@click.option("--domain", default=None, metavar="D", help="Only this domain's deferred mail.")
@click.pass_context
def queue_flush(ctx: click.Context, domain: str | None) -> None:
    """Make every deferred recipient due now (a route came back), as postqueue -f does."""
    count = run(ctx, lambda store: ops.queue_flush(store, domain))
    click.echo(f"{plural(count, 'deferred recipient')} due now; a running serve sends them")


@queue.command("discard")
@config_option
@click.argument("message_id", metavar="ID")
@click.pass_context
def queue_discard(ctx: click.Context, message_id: str) -> None:
    """Give up on a message: its undelivered recipients become discarded (kept, not sent)."""
    count = run(ctx, lambda store: ops.queue_discard(store, message_id))
    click.echo(f"discarded {plural(count, 'recipient')} of {message_id}")


@queue.command("bounce")
@config_option
@click.argument("message_id", metavar="ID")
@click.option(
    "--force",
    is_flag=True,
    help="Send the DSN even to an address literal, a non-public address or a sender whose "
    "SPF failed at arrival (or send one withheld earlier).",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def queue_bounce(ctx: click.Context, message_id: str, force: bool, as_json: bool) -> None:
    """Send an RFC 3464 DSN to the message's reverse-path (never to <>)."""
    config = load_config(ctx)
    result = run(ctx, lambda store: ops.queue_bounce(store, config, message_id, force=force))
    if as_json:
        print_json(ops.bounce_result_to_dict(message_id, result))
    elif result.sent:
        click.echo(
            f"DSN for {message_id} sent to <{result.recipient}> ({result.reply}); "
            f"{plural(result.reported, 'recipient')} reported, the message is now bounced"
        )
    else:
        click.echo(
            f"DSN for {message_id} NOT sent to <{result.recipient}>: {result.withheld}. "
            f"The message is bounced without a DSN; to send the DSN anyway: "
            f"mxspool queue bounce --force {message_id}"
        )


# -- status, report, audit -----------------------------------------------------------------


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Mail counts per domain: held, pending, delivered, parked..."""
    data = run(ctx, ops.status)
    if as_json:
        print_json(data)
        return
    if not data["domains"]:
        click.echo("no domains and no mail yet")
        return
    table = Table("Domain", "Mode", *(key.capitalize() for key in ops.STATUS_COUNTS))
    table.add_column("Oldest")
    table.add_column("/min")
    table.add_column("Stage")

    def cells(row: dict[str, Any]) -> list[str]:
        age = row["oldest_pending_age_s"]
        return [
            *(str(row[key]) for key in ops.STATUS_COUNTS),
            "-" if age is None else format_duration(age),
            str(row["delivery_rate_per_min"]),
            row.get("stage") or "",
        ]

    for row in data["domains"]:
        table.add_row(row["domain"], row["mode"], *cells(row))
    if len(data["domains"]) > 1:
        table.add_row("total", "", *cells(data["totals"]), style="bold")
    console().print(table)
    for hold in data.get("recipient_holds", ()):
        click.echo(f"recipient hold: {hold['address']} ({plural(hold['held'], 'message')} held)")


@cli.command()
@config_option
@click.option("--domain", default=None, metavar="D")
@report_options
@click.pass_context
def report(
    ctx: click.Context,
    domain: str | None,
    fmt: str,
    check: bool,
    *,
    sign: bool,
    out_file: str | None,
    key_file: str | None,
) -> None:
    """Reconciliation report: one row per recipient of each message."""
    out = sys.stdout
    if sign:
        domains = None if domain is None else [domain]
        total, open_rows = signed_report(
            ctx, domains, fmt=fmt, check=check, out=out_file, key_file=key_file
        )
        report_check(check, total, open_rows)
        return
    total, open_rows = run(
        ctx,
        lambda store: write_report(
            out, ops.report(store, domain), ops.REPORT_COLUMNS, fmt=fmt, check=check
        ),
    )
    report_check(check, total, open_rows)


@cli.command()
@config_option
@click.option("--limit", default=100, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def audit(ctx: click.Context, limit: int, as_json: bool) -> None:
    """Operator actions, newest first."""
    entries = run(ctx, lambda store: ops.audit_list(store, limit))
    if as_json:
        print_json([ops.audit_to_dict(entry) for entry in entries])
        return
    if not entries:
        click.echo("no operator actions recorded yet")
        return
    table = Table("At", "Actor", "Action", "Target", "Detail")
    for entry in entries:
        table.add_row(
            dash(ops.iso_time(entry.at)), entry.actor, entry.action, entry.target, entry.detail
        )
    console().print(table)


@click.command("store")
@config_option
@click.option("--repair", is_flag=True, help="Reset the counters that drifted to the recount.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def check_store(ctx: click.Context, repair: bool, as_json: bool) -> None:
    """Recount the recipients and compare with the counters status reads (exit 1 on drift)."""
    result = run(ctx, lambda store: ops.check_store(store, repair=repair))
    if as_json:
        print_json(ops.store_check_to_dict(result))
    elif result.drift:
        table = Table("Domain", "State", "Released", "Counted", "Actual")
        for item in result.drift:
            table.add_row(
                item.domain, item.state, "yes" if item.released else "no", str(item.counted),
                str(item.actual),
            )  # fmt: skip
        console().print(table)
    if not result.drift:
        click.echo("store counters match the recipient rows", err=True)
    elif result.repaired:
        click.echo(f"reset {plural(len(result.drift), 'counter')} to the recount", err=True)
    else:
        fail(
            f"{plural(len(result.drift), 'recipient counter')} disagree with the rows, so "
            "status shows wrong numbers; run 'mxspool check store --repair' to reset them to "
            "the recount (safe while the server runs)",
            1,
        )


# -- log -------------------------------------------------------------------------------------


@cli.command("log")
@config_option
@click.argument("message_id", metavar="ID")
@click.pass_context
def log_command(ctx: click.Context, message_id: str) -> None:
    """The mail-log lines of message ID (arrival, every delivery attempt), in order."""
    from pathlib import Path

    from mxspool.maillog.reader import lines_of

    config = load_config(ctx)
    if not config.log.file:
        fail(
            "the mail log goes to stderr ([log] file is empty), so mxspool cannot read it; "
            f"with systemd: journalctl -u mxspool | grep {message_id}  (or set [log] file)",
            2,
        )
    path = Path(config.log.file)
    found = 0
    try:
        for line in lines_of(path, message_id):
            click.echo(line)
            found += 1
    except OSError as exc:
        fail(f"cannot read the mail log {path}: {exc.strerror or exc}; check [log] file", 1)
    if not found:
        fail(
            f"no lines about {message_id} in {path}; check the queue id (mxspool queue show "
            f"{message_id}), or look in rotated files (zgrep {message_id} {path}*)",
            1,
        )


# -- arc -------------------------------------------------------------------------------------


@cli.group()
def arc() -> None:
    """ARC sealing of released mail: the key and its DNS record."""


@arc.command("keygen")
@click.option("--domain", "domain_name", required=True, metavar="D", help="Sealing domain (d=).")
@click.option("--selector", default="mxspool", show_default=True, metavar="S")
@click.option("--out", default=None, metavar="FILE", help="Default: arc-<selector>.key here.")
@click.option("--bits", default=2048, show_default=True, type=int, help="RSA key size.")
def arc_keygen(domain_name: str, selector: str, out: str | None, bits: int) -> None:
    """Make an RSA sealing key (mode 0600, never overwritten); print its DNS record."""
    from pathlib import Path

    from pydantic import ValidationError

    from mxspool.config import ArcConfig
    from mxspool.delivery.arckey import ArcKeyError, write_new_key, zone_line

    try:
        checked = ArcConfig(domain=domain_name, selector=selector)
    except ValidationError as exc:
        fail(
            "; ".join(
                f"--{item['loc'][0]}: {item['msg'].removeprefix('Value error, ')}"
                for item in exc.errors()
            ),
            2,
        )
    path = Path(out or f"arc-{checked.selector}.key").absolute()
    try:
        key = write_new_key(path, bits)
    except ArcKeyError as exc:
        fail(str(exc), 2)
    click.echo(f"; wrote a {key.bits}-bit RSA key to {path} (mode 0600)")
    click.echo("; publish this record (TXT, in strings of at most 255 characters):")
    click.echo(zone_line(checked.selector, checked.domain, key))
    click.echo("; then add to the configuration and restart mxspool:")
    click.echo(f'[arc]\ndomain = "{checked.domain}"\nselector = "{checked.selector}"')
    click.echo(f"key_file = {json.dumps(str(path))}")


@cli.command("hold")
@config_option
@click.option("--recipient", "address", default=None, metavar="ADDRESS", help="Hold one mailbox.")
@click.option("--list", "listing", is_flag=True, help="List the recipient holds.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def hold(ctx: click.Context, address: str | None, listing: bool, as_json: bool) -> None:
    """Keep one mailbox's mail (and new mail for it) held while its domain is released, until
    'mxspool domain release DOMAIN --only ADDRESS'."""
    if (address is None) == (not listing):
        fail("give one of: --recipient ADDRESS (hold it), or --list", 2)
    if address is not None:
        made = run(ctx, lambda store: ops.hold_recipient(store, address))
        if as_json:
            print_json(ops.recipient_hold_to_dict(made))
            return
        domain = made.suffix.removeprefix("@")
        click.echo(
            f"{made.address} is held ({plural(made.held, 'message')} now, and new mail for it"
            f"{' and its sub-addresses' if made.prefix else ''}); 'mxspool domain release "
            f"{domain} --only {made.address}' lets it go"
        )
        return
    holds = run(ctx, ops.recipient_holds)
    if as_json:
        print_json([ops.recipient_hold_to_dict(item) for item in holds])
        return
    if not holds:
        click.echo("no recipient holds")
        return
    table = Table("Recipient", "Held", "Sub-addresses", "Since", "By")
    for item in holds:
        table.add_row(
            item.address,
            str(item.held),
            "yes" if item.prefix else "no",
            dash(ops.iso_time(item.created_at)),
            dash(item.actor),
        )
    console().print(table)


register_migration_commands(cli)
register_migration_group(cli)  # migration create|list|show|hold|release|...
_check_group = cli.commands["check"]
assert isinstance(_check_group, click.Group)
_check_group.add_command(check_store)
register_tls_commands(cli)  # check tls, acme issue
register_maintenance_commands(cli)  # backup, restore, purge, doctor
register_notify_commands(cli)  # notify test
register_evidence_commands(cli)  # ledger keygen|verify, export


def main() -> None:
    """The ``mxspool`` console script."""
    cli.main(prog_name="mxspool")


if __name__ == "__main__":
    main()
