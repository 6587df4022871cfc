"""The certificate commands: ``mxspool check tls`` and ``mxspool acme issue``.

:mod:`mxspool.cli` registers them (``register``); they need no store, only the configuration.
"""

from __future__ import annotations

import logging
import sys

import click

from mxspool.cli_support import config_option, fail, load_config, print_json
from mxspool.tls.check import check_tls, render
from mxspool.tls.issuer import AcmeError, AcmeSettings, obtain, renewal_reason


@click.command("tls")
@config_option
@click.option(
    "--hold-days",
    type=click.FloatRange(min=0),
    default=None,
    metavar="N",
    help="Days the mail will be held: the certificate must outlive them plus the margin.",
)
@click.option(
    "--margin-days",
    type=click.FloatRange(min=0),
    default=7.0,
    show_default=True,
    metavar="N",
    help="Extra days on top of --hold-days.",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def check_tls_command(
    ctx: click.Context, hold_days: float | None, margin_days: float, as_json: bool
) -> None:
    """The STARTTLS certificate: chain, names, days left against the hold (exit 1 on problems)."""
    config = load_config(ctx)
    report = check_tls(config, hold_days=hold_days, margin_days=margin_days)
    if as_json:
        print_json(report.to_dict())
    else:
        click.echo("\n".join(render(report)))
    if not report.ok:
        ctx.exit(1)


@click.group()
@config_option
def acme() -> None:
    """Certificates from an ACME CA (Let's Encrypt) for the SMTP host name."""


@acme.command("issue")
@config_option
@click.option("--force", is_flag=True, help="Order a new certificate even if the current is good.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def acme_issue(ctx: click.Context, force: bool, as_json: bool) -> None:
    """Obtain or renew the certificate now, once (a running server loads it within seconds)."""
    config = load_config(ctx)
    if not config.acme.enabled:
        fail("ACME is not enabled: set [acme] enabled = true (and email, names) first", 2)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    settings = AcmeSettings.from_config(config)
    reason = renewal_reason(settings)
    if reason is None and not force:
        click.echo("the current certificate is good; nothing to do (--force orders anyway)")
        return
    try:
        summary = obtain(settings)
    except AcmeError as exc:
        fail(f"ACME order failed: {exc}", 1)
    if as_json:
        print_json({"issued": True, "reason": reason or "forced", **summary.to_dict()})
    else:
        click.echo(
            f"issued serial {summary.serial} for {', '.join(summary.names)} by {summary.issuer}, "
            f"expires {summary.not_after:%Y-%m-%d %H:%M}Z"
        )


def register(group: click.Group) -> None:
    """Add ``check tls`` to the ``check`` group and the ``acme`` group to ``group``."""
    check = group.commands["check"]
    assert isinstance(check, click.Group)
    check.add_command(check_tls_command)
    group.add_command(acme)
