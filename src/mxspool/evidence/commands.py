"""The evidence commands: ``ledger keygen``, ``ledger verify`` and ``export``.

Registered on the command group by :mod:`mxspool.cli`; ``report --sign`` (in the CLI) and
``migration report --sign`` call :func:`mxspool.evidence.ledger.sign_report` directly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mxspool.cli_support import config_option, fail, load_config, plural, run
from mxspool.evidence import export as exporter
from mxspool.evidence.keys import (
    LedgerKeyError,
    fingerprint,
    load_public_key,
    public_pem,
    raw_public,
    write_new_key,
)
from mxspool.evidence.verify import verify_ledger
from mxspool.store.base import QUEUE_STATES, Store

DEFAULT_KEY = "ledger.key"


@click.group()
def ledger() -> None:
    """Signed ledgers: the signing key, and checking a ledger someone hands you."""


@ledger.command("keygen")
@click.option(
    "--out", default=DEFAULT_KEY, show_default=True, metavar="FILE", help="The private key."
)
def ledger_keygen(out: str) -> None:
    """Make the Ed25519 key that signs ledgers (mode 0600, never overwritten), and FILE.pub."""
    import base64

    path = Path(out).absolute()
    try:
        key = write_new_key(path)
    except LedgerKeyError as exc:
        fail(str(exc), 2)
    public = key.public_key()
    click.echo(f"; wrote an Ed25519 ledger key to {path} (mode 0600): keep it private")
    click.echo(f"; its public key is in {path}.pub: hand it (or the fingerprint) to the customer")
    click.echo(f"; fingerprint {fingerprint(public)}")
    click.echo(f"; raw (base64) {base64.b64encode(raw_public(public)).decode('ascii')}")
    click.echo(public_pem(public), nl=False)
    click.echo(f"; sign a report with: mxspool report --sign --key {path} --out report.csv")


@ledger.command("verify")
@click.argument("file", metavar="FILE")
@click.option(
    "--public-key",
    "public_key",
    default=None,
    metavar="KEY",
    help="The signer's public key: its .pub file, or the base64 raw key.",
)
def ledger_verify(file: str, public_key: str | None) -> None:
    """Check a signed ledger: signature, hash chain, row count and totals. Exit 0 or 1."""
    try:
        key = None if public_key is None else load_public_key(public_key)
    except LedgerKeyError as exc:
        fail(f"--public-key: {exc}", 2)
    result = verify_ledger(Path(file), key)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if not result.ok:
        for problem in result.problems:
            click.echo(f"FAIL: {problem}")
        fail(
            f"{result.ledger} does NOT hold up ({plural(len(result.problems), 'problem')}); "
            "ask its sender for the original files",
            1,
        )
    manifest = result.manifest or {}
    scope = manifest.get("scope", {})
    domains = scope.get("domains")
    click.echo(
        f"OK: {result.ledger} holds up: {plural(result.rows, 'row')}, chain and totals "
        f"match, signed by {result.fingerprint}"
        + ("" if result.key_given else " (the key the manifest names)")
        + f" at {manifest.get('generated_at')} by {manifest.get('generator')}; "
        + f"domains {', '.join(domains) if domains else 'all'}"
    )
    totals = manifest.get("totals", {})
    click.echo(
        "totals: "
        + ", ".join(f"{state} {count}" for state, count in sorted(totals.items()) if count)
    )


@click.command("export")
@config_option
@click.option("--domain", "domains", multiple=True, required=True, metavar="D")
@click.option("--state", type=click.Choice(QUEUE_STATES), default=None)
@click.option("--format", "fmt", type=click.Choice(exporter.FORMATS), required=True)
@click.pass_context
def export_command(
    ctx: click.Context, domains: tuple[str, ...], state: str | None, fmt: str
) -> None:
    """Write the domain's messages, byte-exact as stored, to stdout (mbox or eml-zip)."""
    out = sys.stdout.buffer
    if out.isatty():
        suffix = "mbox" if fmt == "mbox" else "zip"
        fail(f"the {fmt} export is binary: redirect it, e.g. mxspool export ... > out.{suffix}", 2)

    async def action(store: Store) -> exporter.ExportSummary:
        return await exporter.export(store, list(domains), fmt, out, state)

    summary = run(ctx, action)
    click.echo(
        f"exported {plural(summary.messages, 'message')} ({summary.bytes} bytes) as {fmt}",
        err=True,
    )
    if summary.purged:
        click.echo(
            f"{plural(len(summary.purged), 'message')} skipped, body purged "
            f"('mxspool purge'): {' '.join(summary.purged[:20])}"
            + (" ..." if len(summary.purged) > 20 else ""),
            err=True,
        )
    if summary.missing:
        click.echo(f"gone during the export: {' '.join(summary.missing[:20])}", err=True)
    if not summary.ok:
        fail(
            f"{plural(len(summary.mismatched), 'message')} whose bytes do not match the SHA-256 "
            f"stored at arrival: {' '.join(summary.mismatched[:20])}; the store may be damaged: "
            "run 'mxspool check store' and keep this export with its index",
            1,
        )


def register(cli: click.Group) -> None:
    cli.add_command(ledger)
    cli.add_command(export_command)


def signed_report(
    ctx: click.Context,
    domains: list[str] | None,
    *,
    fmt: str,
    check: bool,
    out: str | None,
    key_file: str | None,
    migration: str | None = None,
) -> tuple[int, int]:
    """``report --sign`` (and ``migration report NAME --sign``): write the signed ledger of
    ``domains`` (None: all) to ``out``; (rows read, rows not final), as the plain report's
    ``--check`` counts them. Prints where the files went and the key's fingerprint."""
    from mxspool.evidence.keys import load_private_key
    from mxspool.evidence.ledger import (
        LedgerError,
        manifest_path,
        sign_report,
        signature_path,
    )

    if fmt != "csv":
        fail("--sign writes the CSV ledger; drop --format json (or --sign)", 2)
    if not out:
        fail(
            "--sign needs --out FILE: a signed ledger is three files (FILE, "
            "FILE.manifest.json, FILE.manifest.sig)",
            2,
        )
    try:
        key = load_private_key(Path(key_file or DEFAULT_KEY))
    except LedgerKeyError as exc:
        fail(f"--key: {exc}", 2)
    config = load_config(ctx)
    path = Path(out)

    async def action(store: Store) -> tuple[int, int, dict[str, object]]:
        try:
            done = await sign_report(
                store,
                path,
                key,
                domains,
                store_url=config.store.url,
                unfinished_only=check,
                migration=migration,
            )
        except LedgerError as exc:
            fail(str(exc), 1)
        return done.seen, done.unfinished, done.manifest

    seen, unfinished, manifest = run(ctx, action)
    click.echo(
        f"signed ledger: {path} ({plural(int(str(manifest['rows'])), 'row')}), "
        f"{manifest_path(path)}, {signature_path(path)}; key {manifest['key_fingerprint']}",
        err=True,
    )
    return seen, unfinished
