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
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console

from mxspool import operations as ops
from mxspool.config import Config, ConfigError
from mxspool.config import load_config as read_config
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
        await store.open()
        try:
            return await action(store)
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except ops.OperationError as exc:
        fail(str(exc), exc.exit_code)
    except StoreError as exc:
        fail(str(exc), 1)


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
