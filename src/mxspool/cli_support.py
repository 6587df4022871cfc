"""The plumbing every ``mxspool`` command stands on: configuration, store lifetime, errors, output.

:mod:`mxspool.cli` (the command group and the core commands) and the command modules it
registers (:mod:`mxspool.migrate.commands`) both import this module, so every command loads its
configuration, opens and closes the store, maps errors to exit codes and prints the same way,
and no command module imports the CLI it is registered on.

Exit status: 0 success, 1 the operation failed (not found, conflict, store error), 2 usage or
configuration error. Errors go to stderr as ``mxspool: ...`` and say what to do next.
"""

from __future__ import annotations

import asyncio
import csv
import json
import sys
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from typing import IO, Any, NoReturn, TypeVar

import click
from rich.console import Console

from mxspool import maillog
from mxspool import operations as ops
from mxspool.actor import cli_actor, use_cli_actor
from mxspool.config import Config, ConfigError
from mxspool.config import load_config as read_config
from mxspool.csvsafe import csv_cells
from mxspool.store import create_store
from mxspool.store.base import Store, StoreError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_CONFIG_KEY = "mxspool.config"


def _remember_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    # ctx.meta is shared by the whole context chain, so a --config given after the
    # subcommand (parsed later) overrides one given before it.
    if value is not None:
        ctx.meta[_CONFIG_KEY] = value


def config_option(func: F) -> F:
    """Accept ``--config FILE`` on this command too (not only before the subcommand)."""
    option = click.option(
        "--config",
        metavar="FILE",
        expose_value=False,
        callback=_remember_config,
        help="Configuration file (default: $MXSPOOL_CONFIG, else ./mxspool.toml, else defaults).",
    )
    return option(func)


def fail(message: str, code: int) -> NoReturn:
    """Print ``mxspool: message`` to stderr and exit with ``code``."""
    click.echo(f"mxspool: {message}", err=True)
    raise click.exceptions.Exit(code)


def load_config(ctx: click.Context) -> Config:
    """The configuration named by ``--config`` (or the defaults); exit 2 if it is invalid."""
    try:
        return read_config(ctx.meta.get(_CONFIG_KEY))
    except ConfigError as exc:
        fail(f"{exc}\nfix the configuration file, or point --config at another one", 2)


def run(ctx: click.Context, action: Callable[[Store], Awaitable[T]]) -> T:
    """Open the configured store, run ``action`` on it, close it; map errors to exit codes."""
    config = load_config(ctx)
    try:
        store = create_store(config.store.url)
    except StoreError as exc:
        fail(str(exc), 2)

    async def go() -> T:
        use_cli_actor(cli_actor())  # the audit log names the OS user, not "cli"
        await store.open()
        try:
            return await action(store)
        finally:
            await store.close()

    log_error = _start_mail_log(config)
    unwritten = maillog.unwritten()
    try:
        return asyncio.run(go())
    except ops.OperationError as exc:
        fail(str(exc), exc.exit_code)
    except StoreError as exc:
        fail(str(exc), 1)
    except ConfigError as exc:  # found only when used, e.g. [delivery] source_address
        fail(f"{exc}\nfix the configuration file, or point --config at another one", 2)
    finally:
        maillog.stop()
        if log_error is not None and maillog.unwritten() > unwritten:
            print(
                f"mxspool: the action is in the audit log, not in the mail log: {log_error}",
                file=sys.stderr,
            )


def _start_mail_log(config: Config) -> str | None:
    """Log operator actions to the mail log when it is a file (``mxspool.maillog``); with
    stderr (journald) the command's own stderr is not the server's log, so nothing is started.
    Why the file could not be opened, or None."""
    if not (config.log.enabled and config.log.file):
        return None
    try:
        maillog.start(config.log)
    except maillog.LogFileError as exc:
        return str(exc)
    return None


def console() -> Console:
    """A rich console on stdout, for tables."""
    # Created per call: the stream is looked up when printing, so tests' captured stdout works.
    # Piped output gets room to spare: rich would otherwise cut every cell to fit 80 columns.
    width = None if sys.stdout.isatty() else 250
    return Console(highlight=False, width=width)


def print_json(data: Any) -> None:
    """``--json`` output: indented, UTF-8 as is."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def plural(number: int, noun: str) -> str:
    """``1 recipient``, ``2 recipients``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def dash(value: object) -> str:
    """A table cell: ``-`` for nothing."""
    return "-" if value is None or value == "" else str(value)


# -- options and output shared by the core commands and the command modules ------------------

MAX_SIZE_HELP = "Largest message the target takes (e.g. 36MiB); none: the profile's default."
PLUS_HELP = "Plus addressing: local<C>tag@ is accepted when local@ is."


def _with_options(func: F, options: Sequence[Callable[[F], F]]) -> F:
    for option in reversed(options):  # the first listed is shown first in --help
        func = option(func)
    return func


def route_options(func: F) -> F:
    """The options of a route change (``domain route``, ``migration route``): ``routes``,
    ``use_mx``, ``tls``, ``profile``, ``max_size``, ``subdomains``, ``plus_separator`` (None:
    leave it as it is) and ``no_plus_addressing``."""
    return _with_options(
        func,
        (
            click.option(
                "--route", "routes", multiple=True, metavar="HOST[:PORT]", help="Destination."
            ),
            click.option(
                "--mx/--no-mx", "use_mx", default=None, help="Route by MX records (or not)."
            ),
            click.option("--tls", default=None, metavar="MODE"),
            click.option(
                "--profile", default=None, metavar="NAME", help="exchange-online, or none."
            ),
            click.option("--max-size", default=None, metavar="SIZE", help=MAX_SIZE_HELP),
            click.option(
                "--subdomains/--no-subdomains", default=None, help="Accept its subdomains too."
            ),
            click.option("--plus-separator", default=None, metavar="C", help=PLUS_HELP),
            click.option(
                "--no-plus-addressing", is_flag=True, help="local+tag@ is refused unless listed."
            ),
        ),
    )


def report_options(func: F) -> F:
    """The options of a reconciliation report (``report``, ``migration report``): ``fmt``,
    ``check``, ``sign``, ``out_file`` and ``key_file``."""
    return _with_options(
        func,
        (
            click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv"),
            click.option(
                "--check", is_flag=True, help="Only unfinished rows; exit 1 if there are any."
            ),
            click.option(
                "--sign", is_flag=True, help="Write a signed ledger to --out (mxspool ledger)."
            ),
            click.option(
                "--out", "out_file", default=None, metavar="FILE", help="With --sign: the ledger."
            ),
            click.option(
                "--key", "key_file", default=None, metavar="FILE", help="With --sign: ledger.key."
            ),
        ),
    )


async def write_report(
    out: IO[str],
    rows: AsyncIterable[dict[str, Any]],
    columns: Sequence[str],
    *,
    fmt: str,
    check: bool,
) -> tuple[int, int]:
    """Write a reconciliation report as CSV (``columns``, in order) or as a JSON array, row by
    row, so a report of millions never sits in memory; with ``check`` only the rows not final.
    Returns (rows read, rows not final) for :func:`report_check`."""
    total = open_rows = written = 0
    writer = csv.writer(out) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(columns)
    else:
        out.write("[")
    async for row in rows:
        total += 1
        if ops.is_final(row):
            if check:
                continue
        else:
            open_rows += 1
        written += 1
        if writer is not None:
            writer.writerow(csv_cells(row[key] for key in columns))
        else:
            out.write("\n  " if written == 1 else ",\n  ")
            out.write(json.dumps(row, ensure_ascii=False))
    if writer is None:
        out.write("\n]\n" if written else "]\n")
    return total, open_rows


def report_check(check: bool, total: int, open_rows: int) -> None:
    """``report --check``: exit 1 while some rows are not final."""
    if not check:
        return
    if open_rows:
        fail(
            f"{open_rows} of {plural(total, 'recipient')} not final (held, pending, "
            "delivering or parked); release, retry or discard them, then check again",
            1,
        )
    click.echo(
        f"all {plural(total, 'recipient')} final (delivered, bounced or discarded)", err=True
    )
