"""The dashboard's pages: server-rendered HTML over the same operations as the CLI and API.

Pages only read. Every change (hold, release, canary, retry, discard) is a button or form that
the dashboard script sends as a JSON POST to /api/v1 with the session's CSRF token, so the
dashboard has no write path of its own. A request with ``X-Partial: 1`` gets only the page's
main content: that is how pages refresh themselves without reloading.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from mxspool import operations as ops
from mxspool.admin.auth import SESSION_COOKIE, SESSION_SECONDS, Session
from mxspool.admin.checklist import Step, checklist
from mxspool.admin.context import AdminContext, context_of
from mxspool.admin.errors import ApiError, as_api_error
from mxspool.admin.history import History
from mxspool.admin.render import (
    action_button,
    action_form,
    age,
    bar_chart,
    bare_page,
    dl,
    esc,
    layout,
    table,
    when,
)
from mxspool.admin.requests import media_type, path_text, query_int, query_str, read_body
from mxspool.store.base import (
    QUEUE_STATES,
    AuditEntry,
    Domain,
    DomainMode,
    QueueEntry,
    QueueFilter,
)
from mxspool.units import format_duration

OVERVIEW_REFRESH_MS = 2000
PAGE_REFRESH_MS = 5000
PAGE_SIZE = 50
HEADER_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Page:
    title: str
    body: str
    refresh_ms: int = 0
    status: int = 200


PageHandler = Callable[[Request, AdminContext], Awaitable[Page]]


def _set_cookie(response: Response, session: Session) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        session.id,
        max_age=int(SESSION_SECONDS),
        path="/",
        httponly=True,
        samesite="strict",
        secure=False,  # plain HTTP on loopback; put TLS in front for anything else
    )


def page(handler: PageHandler, active: str) -> Callable[[Request], Awaitable[Response]]:
    async def run(request: Request) -> Response:
        admin = context_of(request)
        session = admin.auth.session_of(request)
        created: Session | None = None
        if session is None:
            if not admin.auth.open:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
            session = created = admin.auth.sessions.create("")
        try:
            result = await handler(request, admin)
        except Exception as exc:
            error = as_api_error(exc)
            result = Page("Error", f'<p class="error">{esc(error.message)}</p>', 0, error.status)
        if request.headers.get("x-partial") == "1":
            text = result.body
        else:
            text = layout(
                title=result.title,
                body=result.body,
                csrf=session.csrf,
                active=active,
                refresh_ms=result.refresh_ms,
                node=admin.config.smtp.hostname,
                signed_in=not admin.auth.open,
            )
        response = HTMLResponse(text, result.status, headers={"Vary": "X-Partial"})
        if created is not None:
            _set_cookie(response, created)
        return response

    run.__name__ = handler.__name__
    return run


# -- sign-in ----------------------------------------------------------------------------------


def _login_form(next_url: str, message: str = "") -> str:
    error = f'<p class="error" id="login-error">{esc(message)}</p>' if message else ""
    return (
        '<section class="login"><h1>Sign in</h1>'
        "<p>Use the admin token from the node's configuration ([admin] token).</p>"
        f"{error}"
        '<form method="post" action="/login">'
        f'<input type="hidden" name="next" value="{esc(next_url)}">'
        '<label>Token <input type="password" name="token" id="token" '
        'autocomplete="current-password" required autofocus></label>'
        '<button type="submit" id="sign-in">Sign in</button></form></section>'
    )


def _local_path(value: str) -> str:
    """Only same-site paths after sign-in (no open redirect to //evil.example)."""
    if not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", "")


async def login_page(request: Request) -> Response:
    admin = context_of(request)
    if admin.auth.open:
        return RedirectResponse("/", status_code=303)
    try:
        next_url = _local_path(query_str(request, "next", "/") or "/")
    except ApiError:
        next_url = "/"  # a mangled "next" only loses the way back after sign-in
    return HTMLResponse(bare_page("Sign in", _login_form(next_url)))


async def login(request: Request) -> Response:
    admin = context_of(request)
    try:
        if not _same_origin(request):
            raise ApiError(403, "csrf", "sign-in from another site is refused")
        if media_type(request) != "application/x-www-form-urlencoded":
            raise ApiError(415, "unsupported_media_type", "sign in with the form")
        form = parse_qs((await read_body(request, 4096)).decode("utf-8", "replace"))
    except ApiError as exc:
        return HTMLResponse(bare_page("Sign in", _login_form("/", exc.message)), exc.status)
    next_url = _local_path((form.get("next") or ["/"])[0])
    token = (form.get("token") or [""])[0].strip()
    name = admin.auth.match(token) if token else None
    if admin.auth.open:
        return RedirectResponse(next_url, status_code=303)
    if name is None:
        return HTMLResponse(
            bare_page("Sign in", _login_form(next_url, "That token is not valid.")), 401
        )
    response = RedirectResponse(next_url, status_code=303)
    _set_cookie(response, admin.auth.sessions.create(name))
    return response


async def logout(request: Request) -> Response:
    admin = context_of(request)
    session = admin.auth.session_of(request)
    if session is not None and media_type(request) == "application/x-www-form-urlencoded":
        form = parse_qs((await read_body(request, 4096)).decode("utf-8", "replace"))
        presented = (form.get("csrf") or [""])[0]
        if secrets.compare_digest(session.csrf.encode(), presented.encode()):
            admin.auth.sessions.drop(session.id)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# -- overview ---------------------------------------------------------------------------------


def _minute_labels(history: History, now: float) -> list[str]:
    return [time.strftime("%H:%M", time.gmtime(p.start)) + " UTC" for p in history.series(now)]


def _progress(domain: Domain | None, row: dict[str, object], rate_per_min: int) -> str:
    if domain is None or domain.mode is DomainMode.HOLD or domain.released_at is None:
        return "-"
    remaining = int(str(row["pending"])) + int(str(row["delivering"]))
    done = sum(int(str(row[key])) for key in ("delivered", "parked", "bounced", "discarded"))
    total = remaining + done
    if total == 0:
        return "-"
    percent = 100 * done // total
    if remaining == 0:
        eta = "done"
    elif rate_per_min > 0:
        eta = "ETA " + format_duration(remaining / rate_per_min * 60)
    else:
        eta = "ETA -"
    return (
        f'<progress max="{total}" value="{done}">{percent}%</progress> '
        f'<span class="eta">{percent}% · {esc(eta)}</span>'
    )


def _domain_actions(name: str, mode: str) -> str:
    base = f"/api/v1/domains/{quote(name)}"
    if mode == "hold":
        return action_button(
            "Release",
            f"{base}/release",
            confirm=f"Release all held mail of {name} to its route now?",
            done=f"{name} released",
            css="release",
            button_id=f"release-{name}",
        )
    return action_button(
        "Hold",
        f"{base}/hold",
        confirm=f"Hold {name}? Its mail will be kept, not delivered, until released.",
        done=f"{name} is held",
        css="hold",
        button_id=f"hold-{name}",
    )


async def overview(request: Request, admin: AdminContext) -> Page:
    now = time.time()
    status = await ops.status(admin.store, now)
    domains = {domain.name: domain for domain in await ops.list_domains(admin.store)}
    rows = []
    attrs = []
    for row in status["domains"]:
        name = str(row["domain"])
        rows.append(
            [
                f'<a href="/domains/{esc(quote(name))}">{esc(name)}</a>',
                f'<span class="mode mode-{esc(row["mode"])}">{esc(row["mode"])}</span>',
                f'<span class="n held">{row["held"]}</span>',
                f'<span class="n pending">{row["pending"]}</span>',
                f'<span class="n delivering">{row["delivering"]}</span>',
                f'<span class="n delivered">{row["delivered"]}</span>',
                f'<span class="n parked">{row["parked"]}</span>',
                esc(age(row["oldest_pending_age_s"])),
                f"{row['delivery_rate_per_min']}/min",
                _progress(domains.get(name), row, int(row["delivery_rate_per_min"])),
                _domain_actions(name, str(row["mode"])),
            ]
        )
        attrs.append(f'data-domain="{esc(name)}" class="domain-row"')
    totals = status["totals"]
    series = admin.history.series(now)
    labels = _minute_labels(admin.history, now)
    body = (
        "<h1>Overview</h1>"
        + table(
            (
                "Domain",
                "Mode",
                "Held",
                "Pending",
                "Delivering",
                "Delivered",
                "Parked",
                "Oldest waiting",
                "Delivery rate",
                "Release progress",
                "",
            ),
            rows,
            row_attrs=attrs,
            css="domains",
            empty="No domains yet: mxspool domain add DOMAIN --route HOST",
        )
        + f'<p class="totals">Totals: <span class="n held-total">{totals["held"]}</span> held, '
        f"{totals['pending']} pending, {totals['delivering']} delivering, "
        f"{totals['delivered']} delivered, {totals['parked']} parked.</p>"
        '<div class="charts">'
        + bar_chart(
            [p.accepted for p in series],
            title="Accepted (recipients)",
            css="accepted",
            labels=labels,
        )
        + bar_chart(
            [p.delivered for p in series],
            title="Delivered (recipients)",
            css="delivered",
            labels=labels,
        )
        + "</div>"
    )
    return Page("Overview", body, OVERVIEW_REFRESH_MS)


# -- one domain -------------------------------------------------------------------------------

CHECK_MARKS = {True: ("done", "✓"), False: ("todo", "○"), None: ("untracked", "?")}
"""A checklist step's CSS class and mark: done, not yet, not tracked by mxspool."""


def checklist_html(steps: list[Step]) -> str:
    """A domain's migration checklist (the domain page, and each domain of a migration's)."""
    items = []
    for step in steps:
        css, mark = CHECK_MARKS[step.done]
        items.append(
            f'<li class="step {css}" data-step="{esc(step.key)}"><span class="mark">{mark}</span>'
            f" <strong>{esc(step.title)}</strong><br><small>{esc(step.detail)}</small>"
            f"<br><code>{esc(step.command)}</code></li>"
        )
    return f'<ol class="checklist">{"".join(items)}</ol>'


async def domain_page(request: Request, admin: AdminContext) -> Page:
    now = time.time()
    detail = await ops.show_domain(admin.store, path_text(request, "domain"), now)
    domain, status = detail.domain, detail.status
    name = domain.name
    audit = await ops.audit_list(admin.store, 1000)
    steps = checklist(domain, status, audit, await admin.store.stage_events([name]))
    base = f"/api/v1/domains/{quote(name)}"
    data = ops.domain_detail_to_dict(detail)
    counts = data["status"]
    buttons = _domain_actions(name, domain.mode.value)
    if domain.mode is DomainMode.HOLD:
        buttons += action_form(
            f"{base}/release",
            (("only", "Canary address", f"user@{name}"), ("rate", "Rate", "600/min")),
            "Release canary",
            confirm=f"Release only {{only}}'s held mail for {name}?",
            done="canary released",
            form_id="canary",
        )
        buttons += action_form(
            f"{base}/release",
            (("rate", "Rate", "600/min"),),
            "Release paced",
            confirm=f"Release all held mail of {name} at {{rate}}?",
            done=f"{name} released",
            form_id="release-paced",
        )
    series = admin.history.series(now, name)
    labels = _minute_labels(admin.history, now)
    mine = [entry for entry in audit if entry.target == name][:20]
    body = (
        f'<h1>Domain {esc(name)} <span class="mode mode-{esc(domain.mode.value)}">'
        f"{esc(domain.mode.value)}</span></h1>"
        '<div class="columns"><section><h2>Configuration</h2>'
        + dl(
            [
                ("Routes", esc(", ".join(data["routes"]) or "-")),
                ("MX routing", "yes" if domain.use_mx else "no"),
                ("TLS", esc(domain.tls.value)),
                ("Rate", esc(f"{domain.rate}/s" if domain.rate else "default")),
                ("Profile", esc(domain.profile or "-")),
                ("Added", when(data["created_at"])),
                ("Released", when(data["released_at"])),
            ]
        )
        + "</section><section><h2>Counts</h2>"
        + dl(
            [
                (key.capitalize(), f'<span class="n {key}">{counts[key]}</span>')
                for key in ops.STATUS_COUNTS
            ]
            + [("Oldest waiting", esc(age(counts["oldest_pending_age_s"])))]
        )
        + f'</section></div><section class="buttons"><h2>Actions</h2>{buttons}</section>'
        '<div class="charts">'
        + bar_chart([p.accepted for p in series], title="Accepted", css="accepted", labels=labels)
        + bar_chart(
            [p.delivered for p in series], title="Delivered", css="delivered", labels=labels
        )
        + "</div>"
        f"<section><h2>Migration checklist</h2>{checklist_html(steps)}"
        "</section><section><h2>Recent actions</h2>" + _audit_table(mine) + "</section>"
    )
    return Page(f"Domain {name}", body, PAGE_REFRESH_MS)


# -- messages ---------------------------------------------------------------------------------


def _queue_table(rows: list[QueueEntry], *, actions: bool = False) -> str:
    cells = []
    for row in rows:
        line = [
            f'<a href="/messages/{esc(quote(row.message_id))}" class="message-link">'
            f"{esc(row.message_id)}</a>",
            esc(row.rcpt),
            esc(row.mail_from or "<>"),
            when(ops.iso_time(row.received_at)),
            f'<span class="state state-{esc(row.state)}">{esc(row.state)}</span>',
            str(row.attempts),
            esc(row.last_reply or ""),
        ]
        if actions:
            line.append(_message_actions(row.message_id))
        cells.append(line)
    headers = ["Queue id", "Recipient", "Sender", "Received", "State", "Attempts", "Last reply"]
    if actions:
        headers.append("")
    return table(headers, cells, css="queue", empty="No messages match.")


def _message_actions(queue_id: str) -> str:
    base = f"/api/v1/messages/{quote(queue_id)}"
    return action_button(
        "Retry",
        f"{base}/retry",
        confirm=f"Put the parked recipients of {queue_id} back in the queue?",
        done="retrying",
    ) + action_button(
        "Discard",
        f"{base}/discard",
        confirm=f"Discard {queue_id} for every recipient not yet delivered? This is final.",
        done="discarded",
        css="danger",
    )


async def messages_page(request: Request, admin: AdminContext) -> Page:
    q = query_str(request, "q")
    state = query_str(request, "state")
    domain = query_str(request, "domain")
    cursor = query_int(request, "cursor", None)
    wanted = QueueFilter(domain=domain, state=state, search=q)
    rows = await ops.queue_list(admin.store, wanted, limit=PAGE_SIZE + 1, after=cursor)
    page_rows = rows[:PAGE_SIZE]
    direct = ""
    if q and await admin.store.get_message(q.strip()) is not None:
        direct = f'<p>Queue id match: <a href="/messages/{esc(quote(q.strip()))}">{esc(q)}</a></p>'
    more = ""
    if len(rows) > PAGE_SIZE and page_rows:
        params = {
            k: v for k, v in (("q", q), ("state", state), ("domain", domain)) if v is not None
        }
        params["cursor"] = str(page_rows[-1].recipient_id)
        more = f'<p><a href="/messages?{esc(urlencode(params))}" class="next">Next page</a></p>'
    options = "".join(
        f'<option value="{s}"{" selected" if s == state else ""}>{s}</option>'
        for s in ("", *QUEUE_STATES)
    )
    body = (
        "<h1>Messages</h1>"
        '<form method="get" action="/messages" class="search">'
        f'<label>Search <input name="q" value="{esc(q or "")}" '
        'placeholder="recipient, sender, Message-ID or queue id"></label>'
        f'<label>State <select name="state">{options}</select></label>'
        f'<label>Domain <input name="domain" value="{esc(domain or "")}"></label>'
        '<button type="submit">Search</button></form>' + direct + _queue_table(page_rows) + more
    )
    return Page("Messages", body)


async def _headers_of(admin: AdminContext, queue_id: str) -> str:
    """The header section (up to HEADER_BYTES) of the stored message, as text."""
    data = b""
    async for piece in ops.queue_export(admin.store, queue_id):
        data += piece
        if b"\r\n\r\n" in data or len(data) >= HEADER_BYTES:
            break
    head = data.split(b"\r\n\r\n", 1)[0][:HEADER_BYTES]
    return head.decode("utf-8", "replace")


async def message_page(request: Request, admin: AdminContext) -> Page:
    queue_id = path_text(request, "id")
    detail = await ops.queue_show(admin.store, queue_id)
    data = ops.message_detail_to_dict(detail)
    headers = await _headers_of(admin, detail.message.id)
    client = data["client"]
    recipients = table(
        ("Recipient", "State", "Attempts", "Next attempt", "Delivered", "Last reply"),
        [
            [
                esc(r["rcpt"]),
                f'<span class="state state-{esc(r["state"])}">{esc(r["state"])}</span>',
                str(r["attempts"]),
                when(r["next_attempt_at"]),
                when(r["delivered_at"]),
                esc(r["last_reply"] or ""),
            ]
            for r in data["recipients"]
        ],
        css="recipients",
    )
    attempts = table(
        ("When", "Recipient", "Destination", "Outcome", "Reply"),
        [
            [
                when(a["at"]),
                esc(a["rcpt"]),
                esc(a["destination"]),
                esc(a["outcome"]),
                esc(a["reply"]),
            ]
            for a in data["attempts"]
        ],
        css="attempts",
        empty="No delivery attempts yet.",
    )
    raw_url = f"/api/v1/messages/{quote(detail.message.id)}/raw"
    body = (
        f'<h1>Message <span id="queue-id">{esc(detail.message.id)}</span></h1>'
        f'<p class="buttons"><a class="button" href="{esc(raw_url)}" download>Download raw</a> '
        + _message_actions(detail.message.id)
        + "</p><h2>Envelope</h2>"
        + dl(
            [
                ("Message-ID", esc(data["message_id"] or "-")),
                ("Received", when(data["received_at"])),
                ("Sender", esc(data["mail_from"] or "<>")),
                ("Size", f"{data['size']} bytes"),
                ("SHA-256", f"<code>{esc(data['sha256'])}</code>"),
                ("Client", esc(f"{client['address']} (HELO {client['helo']})")),
                ("TLS", esc(client["tls_version"] or "none")),
            ]
        )
        + "<h2>Recipients</h2>"
        + recipients
        + "<h2>Headers</h2>"
        + f'<pre class="headers">{esc(headers)}</pre>'
        + "<h2>Attempts</h2>"
        + attempts
    )
    return Page(f"Message {detail.message.id}", body, PAGE_REFRESH_MS)


async def parked_page(request: Request, admin: AdminContext) -> Page:
    domain = query_str(request, "domain")
    rows = await ops.queue_list(admin.store, QueueFilter(domain=domain, state="parked"), limit=500)
    retry_all = action_button(
        "Retry all parked" + (f" of {domain}" if domain else ""),
        "/api/v1/parked/retry",
        body={"domain": domain} if domain else {},
        confirm="Put every parked recipient"
        + (f" of {domain}" if domain else "")
        + " back in the queue?",
        done="retrying",
    )
    body = (
        f"<h1>Parked</h1><p>Recipients waiting for an operator: {len(rows)}"
        f"{' (first 500)' if len(rows) == 500 else ''}. The last reply is the reason.</p>"
        f'<p class="buttons">{retry_all if rows else ""}</p>' + _queue_table(rows, actions=True)
    )
    return Page("Parked", body, PAGE_REFRESH_MS)


def _audit_table(entries: list[AuditEntry]) -> str:
    return table(
        ("When", "Who", "Action", "Target", "Detail"),
        [
            [
                when(ops.iso_time(e.at)),
                esc(e.actor),
                esc(e.action),
                esc(e.target),
                esc(e.detail),
            ]
            for e in entries
        ],
        css="audit",
        empty="No actions recorded.",
    )


async def audit_page(request: Request, admin: AdminContext) -> Page:
    limit = query_int(request, "limit", 200, low=1, high=10000) or 200
    entries = await ops.audit_list(admin.store, limit)
    return Page("Audit", "<h1>Audit log</h1>" + _audit_table(entries), PAGE_REFRESH_MS)


routes = [
    Route("/", page(overview, "overview"), methods=["GET"]),
    Route("/domains/{domain}", page(domain_page, "overview"), methods=["GET"]),
    Route("/messages", page(messages_page, "messages"), methods=["GET"]),
    Route("/messages/{id}", page(message_page, "messages"), methods=["GET"]),
    Route("/parked", page(parked_page, "parked"), methods=["GET"]),
    Route("/audit", page(audit_page, "audit"), methods=["GET"]),
    Route("/login", login_page, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
]
