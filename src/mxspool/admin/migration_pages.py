"""The dashboard's migration pages: the list of migrations, and one page per migration.

A migration page shows what ``mxspool migration show`` does (:func:`mxspool.migrate.migration.
show`: every domain's stage, counts, release progress and ETA), the migration checklist of
each domain (:mod:`mxspool.admin.checklist`, as a domain-by-step grid and in full per domain)
and the recorded stage events and manual steps. Like every dashboard page it only reads: its
hold and release buttons are the dashboard script's confirmed, CSRF-protected JSON POSTs to
``/api/v1/migrations/...``, the same endpoints (and audit entries) as the API's.
"""

from __future__ import annotations

import time
from urllib.parse import quote

from starlette.requests import Request
from starlette.routing import Route

from mxspool import operations as ops
from mxspool.admin.checklist import Step, checklist
from mxspool.admin.context import AdminContext
from mxspool.admin.dashboard import CHECK_MARKS, PAGE_REFRESH_MS, Page, checklist_html, page
from mxspool.admin.render import action_button, action_form, dl, esc, table, when
from mxspool.admin.requests import path_text
from mxspool.migrate import migration as mig
from mxspool.stage import STAGES
from mxspool.store.base import DomainMode
from mxspool.units import format_duration

MAX_EVENTS = 200
"""Stage events and manual steps the page lists (the newest)."""


def _counts(keys: tuple[str, ...], values: dict[str, int]) -> list[str]:
    return [f'<span class="n {key}">{values[key]}</span>' for key in keys]


def _tenants(item: mig.MigrationView) -> str:
    m = item.migration
    return f"{esc(m.source_tenant or '-')} → {esc(m.target_tenant or '-')}"


async def migrations_page(request: Request, admin: AdminContext) -> Page:
    views = await mig.list_views(admin.store)
    rows = []
    attrs = []
    for item in views:
        name = item.migration.name
        totals = item.totals
        rows.append(
            [
                f'<a href="/migrations/{esc(quote(name))}" class="migration-link">{esc(name)}</a>',
                esc(", ".join(item.migration.domains) or "-"),
                _tenants(item),
                *_counts(("held", "pending", "delivered", "parked"), totals),
                when(ops.iso_time(item.migration.release_at)),
            ]
        )
        attrs.append(f'data-migration="{esc(name)}" class="migration-row"')
    body = "<h1>Migrations</h1>" + table(
        ("Migration", "Domains", "Tenants", "Held", "Pending", "Delivered", "Parked", "Release at"),
        rows,
        row_attrs=attrs,
        css="migrations",
        empty="No migrations yet: mxspool migration create NAME --domain D [--domain D ...]",
    )
    return Page("Migrations", body, PAGE_REFRESH_MS)


def _progress(entry: mig.DomainView) -> str:
    """Release progress and ETA of a released domain; '-' while held or before a release."""
    status = entry.status
    if entry.domain.mode is DomainMode.HOLD or entry.domain.released_at is None:
        return "-"
    remaining = status.pending + status.delivering
    done = status.delivered + status.parked + status.bounced + status.discarded
    total = remaining + done
    if total == 0:
        return "-"
    percent = 100 * done // total
    eta = entry.eta_s
    text = "done" if remaining == 0 else "ETA " + ("-" if eta is None else format_duration(eta))
    return (
        f'<progress max="{total}" value="{done}">{percent}%</progress> '
        f'<span class="eta">{percent}% · {esc(text)}</span>'
    )


def _actions(item: mig.MigrationView) -> str:
    name = item.migration.name
    base = f"/api/v1/migrations/{quote(name)}"
    domains = ", ".join(item.migration.domains)
    held = any(entry.domain.mode is DomainMode.HOLD for entry in item.domains)
    buttons = action_button(
        "Hold all",
        f"{base}/hold",
        confirm=f"Hold every domain of {name} ({domains})? Their mail is kept until released.",
        done=f"{name} is held",
        css="hold",
        button_id="migration-hold",
    )
    if held:
        buttons += action_form(
            f"{base}/release",
            (("rate", "Rate for the target tenant", "600/min"),),
            "Release all",
            confirm=f"Release every domain of {name} ({domains}) at {{rate}}?",
            done=f"{name} released",
            form_id="migration-release",
        )
    return buttons


def _stage_cell(entry: mig.DomainView) -> str:
    position = STAGES.index(entry.stage) + 1
    return (
        f'<span class="stage stage-{esc(entry.stage)}">{esc(entry.stage)}</span> '
        f'<small class="n">{position}/{len(STAGES)}</small>'
    )


def _grid(item: mig.MigrationView, steps: dict[str, list[Step]]) -> str:
    """The checklist as a grid: one row per step, one column per domain."""
    names = [entry.domain.name for entry in item.domains]
    if not names:
        return ""
    first = steps[names[0]]
    rows = []
    for index, step in enumerate(first):
        # The first step names the domain's own stage: the grid shows each one's instead.
        cells = ["Stage" if step.key == "stage" else esc(step.title)]
        for name in names:
            mine = steps[name][index]
            css, mark = CHECK_MARKS[mine.done]
            if mine.key == "stage":
                mark = esc(mine.title.removeprefix("Stage: "))
            cells.append(
                f'<span class="mark {css}" data-domain="{esc(name)}" data-step="{esc(mine.key)}" '
                f'title="{esc(mine.detail)}">{mark}</span>'
            )
        rows.append(cells)
    return table(("Step", *names), rows, css="checkgrid")


async def migration_page(request: Request, admin: AdminContext) -> Page:
    now = time.time()
    item = await mig.show(admin.store, path_text(request, "name"), now)
    m = item.migration
    audit = await ops.audit_list(admin.store, 1000)
    rows = []
    attrs = []
    steps: dict[str, list[Step]] = {}
    events = []
    for entry in item.domains:
        domain = entry.domain
        status = entry.status
        steps[domain.name] = checklist(domain, status, audit, entry.events)
        events.extend(entry.events)
        rows.append(
            [
                f'<a href="/domains/{esc(quote(domain.name))}">{esc(domain.name)}</a>',
                _stage_cell(entry),
                f'<span class="mode mode-{esc(domain.mode.value)}">{esc(domain.mode.value)}</span>',
                f'<span class="n held">{status.held}</span>',
                f'<span class="n pending">{status.pending + status.delivering}</span>',
                f'<span class="n delivered">{status.delivered}</span>',
                f'<span class="n parked">{status.parked}</span>',
                _progress(entry),
            ]
        )
        attrs.append(f'data-domain="{esc(domain.name)}" class="domain-row"')
    totals = item.totals
    rate = m.release_rate
    rate_text = (
        "each domain's own" if rate is None else ("unpaced" if rate == 0 else f"{rate * 60:g}/min")
    )
    events.sort(key=lambda event: event.at, reverse=True)
    event_rows = [
        [
            when(ops.iso_time(event.at)),
            esc(event.domain),
            f'<span class="stage stage-{esc(event.stage)}">{esc(event.stage)}</span>',
            esc(event.actor),
            esc(event.detail),
        ]
        for event in events[:MAX_EVENTS]
    ]
    details = "".join(
        f'<details class="domain-checklist" data-domain="{esc(name)}"><summary>{esc(name)}'
        f"</summary>{checklist_html(domain_steps)}</details>"
        for name, domain_steps in steps.items()
    )
    body = (
        f'<h1>Migration <span id="migration-name">{esc(m.name)}</span></h1>'
        '<div class="columns"><section><h2>Tenants</h2>'
        + dl(
            [
                ("Source", esc(m.source_tenant or "-")),
                ("Target", esc(m.target_tenant or "-")),
                ("Domains", esc(", ".join(m.domains) or "-")),
                ("Created", when(ops.iso_time(m.created_at))),
                ("Release rate", esc(rate_text)),
                ("Release at", when(ops.iso_time(m.release_at))),
            ]
        )
        + "</section><section><h2>Totals</h2>"
        + dl(
            [
                (key.capitalize(), f'<span class="n total-{key}">{totals[key]}</span>')
                for key in ops.STATUS_COUNTS
            ]
        )
        + "</section></div>"
        + f'<section class="buttons"><h2>Actions</h2>{_actions(item)}</section>'
        + "<h2>Domains</h2>"
        + table(
            (
                "Domain",
                "Stage",
                "Mode",
                "Held",
                "Pending",
                "Delivered",
                "Parked",
                "Release progress",
            ),
            rows,
            row_attrs=attrs,
            css="domains migration-domains",
            empty=f"No domains: mxspool migration add-domain {m.name} DOMAIN",
        )
        + "<section><h2>Migration checklist</h2>"
        + _grid(item, steps)
        + details
        + "</section><section><h2>Stages and steps recorded</h2>"
        + table(
            ("When", "Domain", "Stage or step", "Who", "Note"),
            event_rows,
            css="events",
            empty="Nothing recorded yet.",
        )
        + "</section>"
    )
    return Page(f"Migration {m.name}", body, PAGE_REFRESH_MS)


routes = [
    Route("/migrations", page(migrations_page, "migrations"), methods=["GET"]),
    Route("/migrations/{name}", page(migration_page, "migrations"), methods=["GET"]),
]
