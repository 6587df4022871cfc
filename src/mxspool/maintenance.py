"""The upkeep commands: ``backup``, ``restore``, ``purge`` and ``doctor``.

They keep a spool healthy over the weeks a migration lasts, and none of them is about mail
flow, so they live here rather than in :mod:`mxspool.cli`, which registers them. The work is
done below: ``store.backup`` (SQLite copies), ``operations.purge_delivered`` (retention) and
``mxspool.doctor`` (the machine's checks); this module parses, prints and picks exit codes.
"""

from __future__ import annotations

from pathlib import Path

import click

from mxspool import doctor as doctor_checks
from mxspool import operations as ops
from mxspool.cli_support import config_option, fail, load_config, plural, print_json, run
from mxspool.config import Config, ConfigError
from mxspool.config import load_config as read_config
from mxspool.store.backup import POSTGRES_RECIPE, BackupError, backup_sqlite, restore_sqlite
from mxspool.store.sqlite import sqlite_path

SQLITE_SPACE_NOTE = (
    "SQLite reuses the freed pages for new mail; the file does not shrink. To shrink it, stop "
    "the server and run: sqlite3 SPOOL 'VACUUM' (needs free space for a full copy)"
)


def _sqlite_spool(config: Config, command: str) -> Path:
    """The SQLite spool file, or exit 2 with PostgreSQL's own recipe."""
    if not config.store.url.startswith("sqlite:///"):
        click.echo(POSTGRES_RECIPE)
        fail(f"{command} works on SQLite spools; this store is PostgreSQL: see above", 2)
    return sqlite_path(config.store.url)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


@click.command("backup")
@config_option
@click.argument("file", metavar="FILE", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def backup(ctx: click.Context, file: str, force: bool, as_json: bool) -> None:
    """Copy the live SQLite spool to FILE, consistent, while the server keeps accepting."""
    spool = _sqlite_spool(load_config(ctx), "backup")
    try:
        result = backup_sqlite(spool, Path(file), force=force)
    except BackupError as exc:
        fail(str(exc), 1)
    if as_json:
        print_json(
            {"file": str(result.path), "messages": result.messages, "bytes": result.bytes,
             "seconds": round(result.seconds, 3)}
        )  # fmt: skip
        return
    click.echo(
        f"backed up {plural(result.messages, 'message')} ({_mib(result.bytes)}) to "
        f"{result.path} in {result.seconds:.1f} s"
    )


@click.command("restore")
@config_option
@click.argument("file", metavar="FILE", type=click.Path(dir_okay=False))
@click.pass_context
def restore(ctx: click.Context, file: str) -> None:
    """Replace the SQLite spool with the backup FILE (the server must be stopped)."""
    spool = _sqlite_spool(load_config(ctx), "restore")
    try:
        result = restore_sqlite(Path(file), spool)
    except BackupError as exc:
        fail(str(exc), 1)
    click.echo(
        f"restored {plural(result.messages, 'message')} ({_mib(result.bytes)}, schema "
        f"{result.schema_version}) into {result.path}"
    )
    if result.previous is not None:
        click.echo(
            f"the replaced spool is kept as {result.previous}: mail accepted after the backup "
            "was taken is only there; delete it once you no longer need it"
        )
    click.echo(
        "next: start the server (systemctl start mxspool), then check 'mxspool status' and "
        "'mxspool report --check'"
    )


@click.command("purge")
@config_option
@click.option(
    "--delivered-older-than", "older_than", required=True, metavar="AGE",
    help="Drop bodies of mail delivered longer ago than this (e.g. 30d).",
)  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Only say what would go.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def purge(ctx: click.Context, older_than: str, dry_run: bool, as_json: bool) -> None:
    """Drop the bodies of delivered mail; its rows stay in the report, marked purged."""
    result = run(ctx, lambda store: ops.purge_delivered(store, older_than, dry_run=dry_run))
    if as_json:
        print_json(
            {"messages": result.messages, "bytes": result.bytes, "dry_run": result.dry_run,
             "cutoff": ops.iso_time(result.cutoff)}
        )  # fmt: skip
        return
    verb = "would drop" if dry_run else "dropped"
    click.echo(
        f"{verb} the bodies of {plural(result.messages, 'message')} ({_mib(result.bytes)}) "
        f"delivered before {ops.iso_time(result.cutoff)}; their report rows stay"
    )
    if not dry_run and result.messages and load_config(ctx).store.url.startswith("sqlite:"):
        click.echo(SQLITE_SPACE_NOTE, err=True)


@click.command("doctor")
@config_option
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> None:
    """Check this machine for running mxspool: files, ports, certificate, DNS, disk, clock."""
    try:
        config = read_config(ctx.meta.get("mxspool.config"))
    except ConfigError as exc:
        finding = doctor_checks.Finding(
            "configuration", "fail", str(exc), "fix the configuration file"
        )
        findings = [finding]
    else:
        findings = [
            doctor_checks.Finding("configuration", "ok", f"loaded ({config.source})"),
            *doctor_checks.examine(config),
        ]
    if as_json:
        print_json(
            {"ok": not doctor_checks.failed(findings),
             "checks": doctor_checks.to_dicts(findings)}
        )  # fmt: skip
    else:
        for item in findings:
            click.echo(f"{item.status.upper():7} {item.check}: {item.detail}")
            if item.fix and item.status != "ok":
                click.echo(f"        fix: {item.fix}")
    ctx.exit(1 if doctor_checks.failed(findings) else 0)


def register(cli: click.Group) -> None:
    """Add the upkeep commands to the ``mxspool`` group."""
    for command in (backup, restore, purge, doctor):
        cli.add_command(command)
