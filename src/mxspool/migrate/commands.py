"""The migration toolkit's commands: ``recipients``, ``check``, ``probe`` and ``runbook``.

:mod:`mxspool.cli` registers them on the ``mxspool`` group; they use the same plumbing as every
other command (:mod:`mxspool.cli_support`: config loading, store lifetime, error mapping to exit
codes, output), so they behave alike.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import click
from rich.table import Table

from mxspool import cli_support as support
from mxspool import operations as ops
from mxspool.migrate import actions
from mxspool.migrate.dnscheck import DnsReport, Finding
from mxspool.migrate.routecheck import HopVerdict, ip_version
from mxspool.units import parse_duration

_STYLE = {"ok": "green", "todo": "yellow", "info": "dim", "warn": "yellow", "fail": "bold red"}
_LABEL = {"ok": "go", "todo": "to do", "info": "info", "warn": "warn", "fail": "NO-GO"}


def _addresses(number: int) -> str:
    return f"{number} address{'' if number == 1 else 'es'}"


@click.group()
@support.config_option
def recipients() -> None:
    """The list of valid recipients of a domain (others get 550 5.1.1 at RCPT)."""


@recipients.command("import")
@support.config_option
@click.argument("name", metavar="DOMAIN")
@click.argument("file", metavar="FILE", type=click.Path(dir_okay=False))
@click.option("--replace", is_flag=True, help="Make the file the whole list (default: add).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def recipients_import(
    ctx: click.Context, name: str, file: str, replace: bool, as_json: bool
) -> None:
    """Import DOMAIN's addresses from a Get-Recipient/Get-Mailbox CSV or a plain list.

    Only addresses in DOMAIN count (PrimarySmtpAddress and smtp:/SMTP: proxies of
    EmailAddresses). Local parts are compared case-insensitively at RCPT.
    """
    result = support.run(
        ctx, lambda store: actions.import_recipients(store, name, file, replace=replace)
    )
    parsed = result.parsed
    if as_json:
        support.print_json(
            {
                "domain": result.domain,
                "format": parsed.format,
                "rows": parsed.rows,
                "found": len(parsed.addresses),
                "skipped_other_domains": parsed.skipped_other_domains,
                "total": result.total,
                "warnings": list(parsed.warnings),
            }
        )
        return
    for warning in parsed.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(
        f"imported {_addresses(len(parsed.addresses))} of {result.domain} "
        f"from {parsed.rows} {parsed.format} rows"
        + (
            f" ({parsed.skipped_other_domains} in other domains skipped)"
            if parsed.skipped_other_domains
            else ""
        )
        + f"; the list now has {_addresses(result.total)}. Other recipients of "
        f"{result.domain} get '550 5.1.1 Recipient unknown' (a running server applies it "
        "within a second)"
    )


@recipients.command("list")
@support.config_option
@click.argument("name", metavar="DOMAIN")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def recipients_list(ctx: click.Context, name: str, as_json: bool) -> None:
    """DOMAIN's recipient list (empty: every address of the domain is accepted)."""
    addresses = support.run(ctx, lambda store: actions.list_recipients(store, name))
    if as_json:
        support.print_json(addresses)
        return
    if not addresses:
        click.echo(
            f"no recipient list for {name}: every address of the domain is accepted; "
            f"'mxspool recipients import {name} FILE' sets one"
        )
        return
    for address in addresses:
        click.echo(address)


@recipients.command("clear")
@support.config_option
@click.argument("name", metavar="DOMAIN")
@click.pass_context
def recipients_clear(ctx: click.Context, name: str) -> None:
    """Remove DOMAIN's recipient list: every address of the domain is accepted again."""
    count = support.run(ctx, lambda store: actions.clear_recipients(store, name))
    click.echo(
        f"removed {_addresses(count)} from the list of {name}; "
        "every address of the domain is accepted again"
    )


# -- check -----------------------------------------------------------------------------------


@click.group()
@support.config_option
def check() -> None:
    """Preflight and readiness checks (DNS, route, recipients at the target)."""


def _finding_row(finding: Finding) -> list[str]:
    style = _STYLE.get(finding.verdict, "")
    label = _LABEL.get(finding.verdict, finding.verdict)
    return [finding.check, f"[{style}]{label}[/]", finding.detail, finding.fix]


def _findings_table(findings: list[Finding], title: str | None = None) -> Table:
    table = Table("Check", "Verdict", "Detail", "What to do", title=title, title_justify="left")
    for finding in findings:
        table.add_row(*_finding_row(finding))
    return table


def _overall(go: bool) -> None:
    if go:
        click.echo("verdict: GO")
    else:
        support.fail("verdict: NO-GO; fix what the table marks NO-GO, then check again", 1)


def dns_report_to_dict(report: DnsReport) -> dict[str, Any]:
    return {
        "domain": report.domain,
        "spooler": report.spooler,
        "mx": [asdict(entry) for entry in report.mx],
        "mx_ttl": report.mx_ttl,
        "mx_at": report.mx_at,
        "mta_sts": {"mode": report.mta_sts_mode, "mx": report.mta_sts_mx},
        "findings": [asdict(finding) for finding in report.findings],
        "verdict": "go" if report.go else "no-go",
    }


@check.command("dns")
@support.config_option
@click.argument("name", metavar="DOMAIN")
@click.option(
    "--spooler",
    default=None,
    metavar="HOST",
    help="The spooler's MX host (default: [smtp] hostname).",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def check_dns(ctx: click.Context, name: str, spooler: str | None, as_json: bool) -> None:
    """DOMAIN's MX and TTL, MTA-STS policy, SPF and DMARC, judged for the cut-over."""
    config = support.load_config(ctx)
    report = support.run(ctx, lambda store: actions.check_dns(store, config, name, spooler))
    if as_json:
        support.print_json(dns_report_to_dict(report))
    else:
        support.console().print(
            _findings_table(report.findings, f"DNS of {report.domain} (spooler {report.spooler})")
        )
    if as_json:
        if not report.go:
            raise click.exceptions.Exit(1)
        return
    _overall(report.go)


def _route_to_dict(result: actions.RouteCheck) -> dict[str, Any]:
    return {
        "domain": result.domain.name,
        "tls": result.domain.tls.value,
        "error": result.error or None,
        "hops": [
            {
                "hop": str(verdict.report.hop),
                "verdict": "go" if verdict.go else "no-go",
                "connect_ms": _ms(verdict.report.connect_ms),
                "total_ms": _ms(verdict.report.total_ms),
                "local_address": verdict.report.local_address,
                "family": ip_version(verdict.report.local_address) or None,
                "client_cert": _client_cert_to_dict(result, verdict),
                "tls_version": verdict.report.tls_version,
                "cert_verified": verdict.report.cert_verified,
                "cert_names": list(verdict.report.cert_names),
                "size": verdict.report.size_limit,
                "rcpt": [asdict(result) for result in verdict.report.rcpts],
                "findings": [asdict(finding) for finding in verdict.findings],
            }
            for verdict in result.hops
        ],
        "verdict": "go" if result.go else "no-go",
    }


def _client_cert_to_dict(result: actions.RouteCheck, verdict: HopVerdict) -> dict[str, Any] | None:
    """The client certificate configured, and whether this hop's TLS session carried it."""
    cert = result.client_cert
    if cert is None:
        return None
    return {
        "subject": cert.subject,
        "names": list(cert.names),
        "not_after": cert.not_after.isoformat(timespec="seconds"),
        "presented": verdict.report.client_cert_presented,
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@check.command("route")
@support.config_option
@click.argument("name", metavar="DOMAIN")
@click.option("--rcpt", default=None, metavar="ADDRESS", help="Probe this (default postmaster@).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def check_route(ctx: click.Context, name: str, rcpt: str | None, as_json: bool) -> None:
    """Each hop of DOMAIN's route: connect, EHLO, STARTTLS, certificate, SIZE, RCPT (no DATA)."""
    config = support.load_config(ctx)
    result = support.run(ctx, lambda store: actions.check_route(store, config, name, rcpt))
    if as_json:
        support.print_json(_route_to_dict(result))
        if not result.go:
            raise click.exceptions.Exit(1)
        return
    console = support.console()
    if result.error:
        click.echo(result.error, err=True)
    for verdict in result.hops:
        report = verdict.report
        title = (
            f"{report.hop} ({'go' if verdict.go else 'NO-GO'}, "
            f"{report.total_ms or 0:.0f} ms in all)"
        )
        console.print(_findings_table(verdict.findings, title))
    _overall(result.go)


@check.command("recipients")
@support.config_option
@click.argument("name", metavar="DOMAIN")
@click.option("--concurrency", default=2, show_default=True, help="Connections at once.")
@click.option("--rate", default="5/s", show_default=True, help="RCPT probes at most this fast.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def check_recipients(
    ctx: click.Context, name: str, concurrency: int, rate: str, as_json: bool
) -> None:
    """Ask DOMAIN's route about each held recipient (RCPT, then RSET; never DATA)."""
    config = support.load_config(ctx)
    result = support.run(
        ctx,
        lambda store: actions.check_recipients(
            store, config, name, concurrency=concurrency, rate=rate
        ),
    )
    if as_json:
        support.print_json(
            {
                "domain": result.domain.name,
                "checked": len(result.results),
                "ready": result.ready,
                "not_ready": result.not_ready,
                "unknown": result.unknown,
                "recipients": [asdict(item) for item in result.results],
            }
        )
    elif not result.results:
        click.echo(f"nothing is held for {result.domain.name}; no recipient to check")
    else:
        table = Table("Recipient", "State", "Reply", "What it means")
        styles = {"ready": "green", "unknown": "yellow"}
        for item in result.results:
            style = styles.get(item.state, "bold red")
            table.add_row(item.address, f"[{style}]{item.state}[/]", item.reply, item.hint)
        support.console().print(table)
        click.echo(
            f"{result.ready} of {len(result.results)} recipients ready at the target, "
            f"{result.not_ready} not ready, {result.unknown} unknown"
        )
    _recipients_advice(result, as_json)


def _recipients_advice(result: actions.RecipientsCheck, as_json: bool) -> None:
    """Advice and exit status: 0 all ready, 1 some not ready (5xx), 3 none refused but some
    unknown (a 4xx, or no answer): check again later. 2 stays usage/configuration errors."""
    name = result.domain.name
    if not as_json:
        if result.not_ready:
            click.echo(
                f"{result.not_ready} not ready (refused with 5xx): create them at the target "
                f"(or release only the ready ones with 'mxspool domain release {name} "
                "--only ADDRESS')",
                err=True,
            )
        if result.unknown:
            click.echo(
                f"{result.unknown} unknown (a temporary refusal such as Exchange Online's "
                "'451 4.7.500 Server busy', or no answer): not a verdict on the mailboxes; run "
                f"'mxspool check recipients {name}' again later",
                err=True,
            )
    if result.not_ready:
        raise click.exceptions.Exit(1)
    if result.unknown:
        raise click.exceptions.Exit(3)


# -- runbook -----------------------------------------------------------------------------------


@click.command()
@support.config_option
@click.argument("names", metavar="DOMAIN...", nargs=-1, required=True)
@click.option("--spooler-host", required=True, metavar="HOST", help="The spooler's MX host name.")
@click.option("--spooler-ip", required=True, metavar="IP", help="Its public IPv4 address.")
@click.option("--target-host", default=None, metavar="HOST", help="The target tenant's MX host.")
@click.option("--source-tenant", default=None, metavar="LABEL", help="Name of the source tenant.")
@click.option("--target-tenant", default=None, metavar="LABEL", help="Name of the target tenant.")
@click.option(
    "--source-initial", default=None, metavar="DOMAIN", help="Its NAME.onmicrosoft.com domain."
)
@click.option(
    "--target-initial", default=None, metavar="DOMAIN", help="Its NAME.onmicrosoft.com domain."
)
@click.option("--format", "fmt", type=click.Choice(["md", "ps1"]), default="md", show_default=True)
@click.pass_context
def runbook(
    ctx: click.Context,
    *,
    names: tuple[str, ...],
    spooler_host: str,
    spooler_ip: str,
    target_host: str | None,
    source_tenant: str | None,
    target_tenant: str | None,
    source_initial: str | None,
    target_initial: str | None,
    fmt: str,
) -> None:
    """The ordered migration plan: DNS, both tenants' PowerShell, mxspool steps.

    One DOMAIN without tenant options: the target tenant's side only. Several domains, or
    --source-tenant/--target-tenant/--source-initial/--target-initial: the whole
    tenant-to-tenant move, source tenant included (as PowerShell: run with -Step KEY).
    """
    config = support.load_config(ctx)
    text = support.run(
        ctx,
        lambda store: actions.migration_runbook(
            store,
            config,
            names,
            spooler_host=spooler_host,
            spooler_ip=spooler_ip,
            target_host=target_host,
            source_tenant=source_tenant,
            target_tenant=target_tenant,
            source_initial=source_initial,
            target_initial=target_initial,
            fmt=fmt,
        ),
    )
    click.echo(text)


# -- probe -------------------------------------------------------------------------------------


@click.command()
@support.config_option
@click.argument("name", metavar="DOMAIN")
@click.option("--to", default=None, metavar="ADDRESS", help="Recipient (default postmaster@).")
@click.option("--wait", default="30s", show_default=True, help="How long to wait for delivery.")
@click.option("--list", "list_only", is_flag=True, help="List the domain's probe messages.")
@click.option("--discard", is_flag=True, help="Discard the domain's undelivered probes.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def probe(
    ctx: click.Context,
    *,
    name: str,
    to: str | None,
    wait: str,
    list_only: bool,
    discard: bool,
    as_json: bool,
) -> None:
    """Send a marked test message through the spooler's own listener and follow it."""
    if list_only and discard:
        support.fail("give --list or --discard, not both", 2)
    if list_only:
        entries = support.run(ctx, lambda store: actions.list_probes(store, name))
        if as_json:
            support.print_json([ops.queue_entry_to_dict(entry) for entry in entries])
        elif not entries:
            click.echo(f"no probe messages for {name}")
        else:
            table = Table("ID", "Recipient", "State", "Received", "Last reply")
            for entry in entries:
                table.add_row(
                    entry.message_id,
                    entry.rcpt,
                    entry.state,
                    support.dash(ops.iso_time(entry.received_at)),
                    support.dash(entry.last_reply),
                )
            support.console().print(table)
        return
    if discard:
        count = support.run(ctx, lambda store: actions.discard_probes(store, name))
        click.echo(f"discarded {support.plural(count, 'probe recipient')} of {name}")
        return
    try:
        seconds = parse_duration(wait)
    except ValueError as exc:
        support.fail(f"--wait: {exc}", 2)
    config = support.load_config(ctx)
    result = support.run(ctx, lambda store: actions.probe(store, config, name, to, wait=seconds))
    _print_probe(result, as_json)


def _print_probe(result: actions.ProbeResult, as_json: bool) -> None:
    delivered = result.state == "delivered"
    if as_json:
        support.print_json(
            {
                "domain": result.domain.name,
                "mode": result.domain.mode.value,
                "rcpt": result.rcpt,
                "id": result.queue_id,
                "token": result.token,
                "accepted": result.submit_reply,
                "stored": result.stored,
                "state": result.state,
                "remote_reply": result.reply,
                "waited_s": result.waited,
            }
        )
    else:
        click.echo(f"accepted by {result.listener}: {result.submit_reply}")
        click.echo(
            f"stored as {result.queue_id} (tagged probe, token {result.token}) for <{result.rcpt}>"
            if result.stored
            else f"NOT found in the store as {result.queue_id}"
        )
        if result.state == "held":
            click.echo(
                f"held: {result.domain.name} is in hold; it goes out with the release "
                f"('mxspool probe {result.domain.name} --discard' drops it instead)"
            )
        elif delivered:
            click.echo(f"delivered in {result.waited:g} s; the next hop said: {result.reply}")
    if not result.stored:
        raise click.exceptions.Exit(1)
    if result.domain.mode.value == "relay" and not delivered:
        if not as_json:
            click.echo(
                f"not delivered after {result.waited:g} s (state {result.state}"
                + (f", last reply {result.reply}" if result.reply else "")
                + f"); 'mxspool queue show {result.queue_id}' follows it, "
                f"'mxspool check route {result.domain.name}' checks the route",
                err=True,
            )
        raise click.exceptions.Exit(1)


def register(group: click.Group) -> None:
    """Add the migration commands to the ``mxspool`` command group."""
    group.add_command(recipients)
    group.add_command(check)
    group.add_command(runbook)
    group.add_command(probe)
