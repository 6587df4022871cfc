"""HTML for the dashboard: one page layout, small helpers and inline SVG charts.

Plain ``string.Template`` and ``html.escape``: every value that comes from the store or the
request goes through ``esc`` (attributes included), so a recipient address or a remote reply
can never become markup. The pages need no assets from other hosts and no build step; the
Content-Security-Policy allows only this origin's script and stylesheet.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from string import Template
from typing import Any

from mxspool.units import format_duration

NAV_ALL = (
    ("overview", "/", "Overview"),
    ("migrations", "/migrations", "Migrations"),
    ("messages", "/messages", "Messages"),
    ("parked", "/parked", "Parked"),
    ("audit", "/audit", "Audit"),
)

_LAYOUT = Template(
    """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="$csrf">
<title>$title · mxspool</title>
<link rel="stylesheet" href="/static/app.css">
<script src="/static/app.js" defer></script>
</head>
<body>
<header>
<a class="brand" href="/">mxspool</a>
<nav>$nav</nav>
$signout
</header>
<div id="flash" class="flash" role="status" aria-live="polite"></div>
<main id="main" data-refresh="$refresh">
$body
</main>
<footer>mxspool admin · $node</footer>
</body>
</html>
"""
)


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def layout(
    *,
    title: str,
    body: str,
    csrf: str,
    active: str,
    refresh_ms: int,
    node: str,
    signed_in: bool,
) -> str:
    current = ' class="active"'
    nav = "".join(
        f'<a href="{url}"{current if key == active else ""}>{esc(label)}</a>'
        for key, url, label in NAV_ALL
    )
    signout = (
        '<form method="post" action="/logout" class="signout">'
        f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
        '<button type="submit">Sign out</button></form>'
        if signed_in
        else ""
    )
    return _LAYOUT.substitute(
        csrf=esc(csrf),
        title=esc(title),
        nav=nav,
        signout=signout,
        refresh=str(refresh_ms),
        body=body,
        node=esc(node),
    )


def bare_page(title: str, body: str) -> str:
    """A page outside the signed-in layout (sign-in, errors)."""
    return _LAYOUT.substitute(
        csrf="", title=esc(title), nav="", signout="", refresh="0", body=body, node=""
    )


def age(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


def when(iso: str | None) -> str:
    return "-" if not iso else f'<time datetime="{esc(iso)}">{esc(iso.replace("T", " "))}</time>'


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    row_attrs: Sequence[str] | None = None,
    css: str = "",
    empty: str = "Nothing here.",
) -> str:
    """A table; cells are HTML already (escape values with ``esc`` first)."""
    head = "".join(f"<th>{esc(name)}</th>" for name in headers)
    body = []
    for index, row in enumerate(rows):
        attrs = f" {row_attrs[index]}" if row_attrs is not None else ""
        body.append(f"<tr{attrs}>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>")
    if not body:
        body.append(f'<tr><td colspan="{len(headers)}" class="empty">{esc(empty)}</td></tr>')
    return (
        f'<table class="{esc(css)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def dl(items: Iterable[tuple[str, str]]) -> str:
    """A definition list; values are HTML already."""
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def action_button(
    label: str,
    url: str,
    *,
    confirm: str = "",
    body: dict[str, Any] | None = None,
    done: str = "",
    css: str = "",
    next_url: str = "",
    button_id: str = "",
) -> str:
    """A button the dashboard script turns into a confirmed, CSRF-protected JSON POST."""
    attrs = [
        'type="button"',
        f'class="action {esc(css)}"',
        f'data-url="{esc(url)}"',
        f'data-body="{esc(json.dumps(body or {}))}"',
    ]
    if confirm:
        attrs.append(f'data-confirm="{esc(confirm)}"')
    if done:
        attrs.append(f'data-done="{esc(done)}"')
    if next_url:
        attrs.append(f'data-next="{esc(next_url)}"')
    if button_id:
        attrs.append(f'id="{esc(button_id)}"')
    return f"<button {' '.join(attrs)}>{esc(label)}</button>"


def action_form(
    url: str,
    fields: Sequence[tuple[str, str, str]],
    submit: str,
    *,
    confirm: str = "",
    done: str = "",
    form_id: str = "",
) -> str:
    """A form posted as JSON by the dashboard script; fields are (name, label, placeholder).

    ``confirm`` may name fields as {name}; empty fields are left out of the body.
    """
    inputs = "".join(
        f'<label>{esc(label)} <input name="{esc(name)}" placeholder="{esc(placeholder)}"></label>'
        for name, label, placeholder in fields
    )
    extra = f' id="{esc(form_id)}"' if form_id else ""
    return (
        f'<form class="action-form" data-url="{esc(url)}" data-confirm="{esc(confirm)}" '
        f'data-done="{esc(done)}"{extra}>{inputs}<button type="submit">{esc(submit)}</button>'
        "</form>"
    )


def bar_chart(values: Sequence[int], *, title: str, css: str, labels: Sequence[str]) -> str:
    """An inline SVG bar chart of per-minute values, oldest left; ``labels`` title each bar."""
    width, height, pad = 600, 120, 18
    top = max(values, default=0)
    scale = (height - pad * 2) / top if top else 0.0
    slot = width / max(len(values), 1)
    bars = []
    for index, value in enumerate(values):
        bar = value * scale
        x = index * slot
        y = height - pad - bar
        bars.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(slot - 1, 1):.1f}" height="{bar:.1f}">'
            f"<title>{esc(labels[index] if index < len(labels) else '')}: {value}/min</title>"
            "</rect>"
        )
    total = sum(values)
    last = values[-1] if values else 0
    return (
        f'<figure class="chart {esc(css)}"><figcaption>{esc(title)}: '
        f'<strong class="chart-now">{last}/min</strong> now, {total} in the last hour</figcaption>'
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}" '
        f'preserveAspectRatio="none">'
        f'<line x1="0" y1="{height - pad}" x2="{width}" y2="{height - pad}" class="axis"/>'
        f"{''.join(bars)}"
        f'<text x="2" y="12" class="label">max {top}/min</text>'
        f'<text x="2" y="{height - 4}" class="label">-60 min</text>'
        f'<text x="{width - 2}" y="{height - 4}" class="label end">now</text>'
        "</svg></figure>"
    )
