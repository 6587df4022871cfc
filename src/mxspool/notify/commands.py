"""``mxspool notify test``: send a test event to every ``[[notify]]`` target, once, and say per
target whether it got through, so an operator knows on day 0 that the alerts will arrive.

One attempt per target, no retries (a failure is shown at once, with its reason); the
targets are tried in parallel. Exit status 0 when every target accepted it, 1 when any did
not (or none is configured), 2 for a configuration error. :mod:`mxspool.cli` registers it.
"""

from __future__ import annotations

import asyncio
import time

import click

from mxspool.cli_support import config_option, fail, load_config, print_json
from mxspool.config import ConfigError
from mxspool.notify.build import build_targets
from mxspool.notify.dispatcher import Outcome
from mxspool.notify.events import trial_event
from mxspool.notify.targets import SendFailed, Target


async def _try(target: Target, node: str) -> tuple[Outcome, float]:
    started = time.monotonic()
    try:
        text = await target.attempt(trial_event(node, target.name))
        outcome = Outcome(target.name, True, 1, text)
    except SendFailed as exc:
        outcome = Outcome(target.name, False, 1, str(exc))
    except Exception as exc:
        outcome = Outcome(target.name, False, 1, f"unexpected error: {exc!r}")
    finally:
        await target.close()
    return outcome, time.monotonic() - started


async def _try_all(targets: list[Target], node: str) -> list[tuple[Outcome, float]]:
    return list(await asyncio.gather(*(_try(target, node) for target in targets)))


@click.group("notify")
@config_option
def notify() -> None:
    """Notifications to webhooks and mail addresses ([[notify]] in the configuration)."""


@notify.command("test")
@config_option
@click.option("--target", "only", default=None, metavar="NAME", help="Only this target.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def notify_test(ctx: click.Context, only: str | None, as_json: bool) -> None:
    """Send a test event to every target; per target OK or the reason it failed."""
    config = load_config(ctx)
    try:
        targets = build_targets(config)
    except ConfigError as exc:
        fail(f"{exc}\nfix the configuration file, or point --config at another one", 2)
    if only is not None:
        targets = [target for target in targets if target.name == only]
        if not targets:
            names = ", ".join(t.name for t in build_targets(config)) or "none"
            fail(f"no [[notify]] target named {only!r} (configured: {names})", 1)
    if not targets:
        fail(
            f"no [[notify]] targets in {config.source}: add a webhook (url, secret) or an "
            "email (to, relay) entry; README 'Notifications' shows both",
            1,
        )
    results = asyncio.run(_try_all(targets, config.smtp.hostname))
    if as_json:
        print_json(
            [
                {
                    "target": outcome.target,
                    "kind": target.kind,
                    "ok": outcome.ok,
                    "result": outcome.text,
                    "seconds": round(seconds, 3),
                }
                for target, (outcome, seconds) in zip(targets, results, strict=True)
            ]
        )
    else:
        for target, (outcome, seconds) in zip(targets, results, strict=True):
            verdict = "OK    " if outcome.ok else "FAILED"
            click.echo(
                f"{verdict} {target.kind} {outcome.target}: {outcome.text} ({seconds:.1f} s)"
            )
    if not all(outcome.ok for outcome, _ in results):
        ctx.exit(1)


def register(cli: click.Group) -> None:
    cli.add_command(notify)
