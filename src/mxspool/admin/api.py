"""The /api/v1 endpoints: JSON in, JSON out, each a thin shell over ``mxspool.operations``.

A handler parses its request, calls one operation (the same one the CLI calls, with the
caller's token name or "dashboard" as the audit actor) and renders the result with the
operations' ``*_to_dict`` helpers, so the API and ``--json`` print the same shapes. Errors
become ``{"error": {"code", "message"}}``: 400 malformed, 401 no or wrong token, 403 missing
CSRF token (dashboard), 404 unknown, 409 conflict, 413 too large, 415 not JSON, 422 invalid.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from mxspool import operations as ops
from mxspool.admin.auth import Principal
from mxspool.admin.context import AdminContext, context_of
from mxspool.admin.errors import ApiError, as_api_error, error_response
from mxspool.admin.requests import (
    Fields,
    path_text,
    query_choice,
    query_flag,
    query_int,
    query_str,
    read_json,
)
from mxspool.csvsafe import csv_cells
from mxspool.store.base import QueueFilter

MAX_PAGE = 1000
WRITE_METHODS = frozenset({"POST", "PATCH", "DELETE"})


@dataclass(frozen=True, slots=True)
class Call:
    request: Request
    admin: AdminContext
    principal: Principal
    body: dict[str, Any]

    @property
    def actor(self) -> str:
        return self.principal.actor

    def path(self, key: str) -> str:
        return path_text(self.request, key)


Handler = Callable[[Call], Awaitable[Response]]


def endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Authenticate, read the JSON body of writes, run ``handler``, map errors to JSON."""

    async def run(request: Request) -> Response:
        try:
            admin = context_of(request)
            principal = admin.auth.api_principal(request)
            body = await read_json(request) if request.method in WRITE_METHODS else {}
            return await handler(Call(request, admin, principal, body))
        except Exception as exc:
            return error_response(as_api_error(exc))

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status)


# -- status and domains ---------------------------------------------------------------------


async def get_status(call: Call) -> Response:
    return _json(await ops.status(call.admin.store))


async def list_domains(call: Call) -> Response:
    domains = await ops.list_domains(call.admin.store)
    return _json({"domains": [ops.domain_to_dict(domain) for domain in domains]})


async def add_domain(call: Call) -> Response:
    fields = Fields(call.body, ("domain", "routes", "mx", "tls", "hold", "profile", *_GATE))
    domain = await ops.add_domain(
        call.admin.store,
        fields.required_text("domain"),
        fields.text_list("routes") or [],
        use_mx=bool(fields.flag("mx", False)),
        tls=fields.text("tls", "verify") or "verify",
        hold=bool(fields.flag("hold", False)),
        profile=fields.text("profile"),
        max_size=_max_size(call.body, fields),
        subdomains=bool(fields.flag("subdomains", False)),
        plus_separator=fields.text("plus_separator", "+") or "",
        actor=call.actor,
    )
    return _json(ops.domain_to_dict(domain), 201)


_GATE = ("max_size", "subdomains", "plus_separator")
"""The recipient gate's fields, as ``domain add|route --max-size --subdomains
--plus-separator`` ("plus_separator": "" switches plus addressing off)."""


def _max_size(body: Mapping[str, Any], fields: Fields) -> str | None:
    """``max_size`` as bytes (a number) or a size text ("36MiB"); "none" clears it."""
    value = body.get("max_size")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return fields.text("max_size")


async def get_domain(call: Call) -> Response:
    detail = await ops.show_domain(call.admin.store, call.path("domain"))
    return _json(ops.domain_detail_to_dict(detail))


async def patch_domain(call: Call) -> Response:
    fields = Fields(call.body, ("routes", "mx", "tls", "profile", *_GATE))
    if not any(fields.given(key) for key in ("routes", "mx", "tls", "profile", *_GATE)):
        raise ApiError(
            422,
            "invalid",
            "nothing to change; give routes, mx, tls, profile, max_size, subdomains or "
            "plus_separator",
        )
    domain = await ops.route_domain(
        call.admin.store,
        call.path("domain"),
        fields.text_list("routes"),
        use_mx=fields.flag("mx"),
        tls=fields.text("tls"),
        profile=fields.text("profile"),
        max_size=_max_size(call.body, fields),
        subdomains=fields.flag("subdomains"),
        plus_separator=fields.text("plus_separator"),
        actor=call.actor,
    )
    return _json(ops.domain_to_dict(domain))


async def delete_domain(call: Call) -> Response:
    fields = Fields(call.body, ("force",))
    force = bool(fields.flag("force", False)) or query_flag(call.request, "force")
    name = ops.normalize_domain(call.path("domain"))
    await ops.remove_domain(call.admin.store, name, force, actor=call.actor)
    return _json({"removed": name})


async def hold_domain(call: Call) -> Response:
    Fields(call.body, ())
    domain = await ops.hold_domain(call.admin.store, call.path("domain"), actor=call.actor)
    return _json(ops.domain_to_dict(domain))


async def release_domain(call: Call) -> Response:
    """Idempotent: releasing a domain that already relays changes nothing but is audited."""
    fields = Fields(call.body, ("rate", "only"))
    result = await ops.release_domain(
        call.admin.store,
        call.path("domain"),
        rate=fields.text("rate"),
        only=fields.text("only"),
        actor=call.actor,
    )
    return _json(
        {
            "domain": ops.domain_to_dict(result.domain),
            "canary": result.canary,
            "released_recipients": result.released_recipients,
        }
    )


# -- messages -------------------------------------------------------------------------------


async def list_messages(call: Call) -> Response:
    """Recipient rows, oldest first; ``next_cursor`` is the ``cursor`` of the next page."""
    request = call.request
    limit = query_int(request, "limit", 100, low=1, high=MAX_PAGE) or 100
    wanted = QueueFilter(
        domain=query_str(request, "domain"),
        state=query_str(request, "state"),
        search=query_str(request, "q"),
    )
    after = query_int(request, "cursor", None)
    rows = await ops.queue_list(call.admin.store, wanted, limit=limit + 1, after=after)
    page = rows[:limit]
    more = len(rows) > limit
    return _json(
        {
            "messages": [ops.queue_entry_to_dict(row) for row in page],
            "next_cursor": page[-1].recipient_id if more and page else None,
        }
    )


async def get_message(call: Call) -> Response:
    detail = await ops.queue_show(call.admin.store, call.path("id"))
    return _json(ops.message_detail_to_dict(detail))


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


async def raw_message(call: Call) -> Response:
    """The message exactly as stored (RFC 5322 bytes), as a download."""
    queue_id = call.path("id")
    pieces = ops.queue_export(call.admin.store, queue_id)
    first = await anext(pieces, b"")  # NotFound (404) here, before any byte is sent

    async def body() -> AsyncIterator[bytes]:
        yield first
        async for piece in pieces:
            yield piece

    filename = _SAFE_NAME.sub("_", queue_id) or "message"
    return StreamingResponse(
        body(),
        media_type="message/rfc822",
        headers={"Content-Disposition": f'attachment; filename="{filename}.eml"'},
    )


async def retry_message(call: Call) -> Response:
    Fields(call.body, ())
    count = await ops.queue_retry(call.admin.store, call.path("id"), actor=call.actor)
    return _json({"id": call.path("id"), "retried": count})


async def discard_message(call: Call) -> Response:
    Fields(call.body, ())
    count = await ops.queue_discard(call.admin.store, call.path("id"), actor=call.actor)
    return _json({"id": call.path("id"), "discarded": count})


async def retry_parked(call: Call) -> Response:
    """Every parked recipient (optionally of one domain) back to pending."""
    fields = Fields(call.body, ("domain",))
    count = await ops.queue_retry(
        call.admin.store, parked=True, domain=fields.text("domain"), actor=call.actor
    )
    return _json({"retried": count})


# -- report and audit -----------------------------------------------------------------------


async def get_report(call: Call) -> Response:
    """The reconciliation report, streamed: a JSON array (as ``report --format json``) or CSV."""
    fmt = query_choice(call.request, "format", ("json", "csv"), "json")
    domain = query_str(call.request, "domain")
    return await report_response(
        ops.report(call.admin.store, domain),  # bad domain names fail at the first row: a 422
        ops.REPORT_COLUMNS,
        fmt,
        csv_headers={"Content-Disposition": 'attachment; filename="mxspool-report.csv"'},
    )


async def report_response(
    rows: AsyncIterator[dict[str, Any]],
    columns: Sequence[str],
    fmt: str,
    *,
    csv_headers: Mapping[str, str] | None = None,
) -> Response:
    """A reconciliation report streamed as CSV (``columns``, in order) or as a JSON array (as
    ``report --format json``). The first row is read before the response starts, so an error
    (an unknown domain or migration) is still an error status, not a cut-off body."""
    first = await anext(rows, None)

    async def csv_body() -> AsyncIterator[bytes]:
        yield _csv_line(list(columns))
        if first is not None:
            yield _csv_line(csv_cells(first[key] for key in columns))
        async for row in rows:
            yield _csv_line(csv_cells(row[key] for key in columns))

    async def json_body() -> AsyncIterator[bytes]:
        if first is None:
            yield b"[]\n"
            return
        yield b"[\n  " + _dumps(first)
        async for row in rows:
            yield b",\n  " + _dumps(row)
        yield b"\n]\n"

    if fmt == "csv":
        return StreamingResponse(
            csv_body(), media_type="text/csv; charset=utf-8", headers=csv_headers
        )
    return StreamingResponse(json_body(), media_type="application/json")


def _dumps(row: dict[str, Any]) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode()


def _csv_line(cells: list[str]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerow(cells)
    return out.getvalue().encode()


async def get_audit(call: Call) -> Response:
    limit = query_int(call.request, "limit", 100, low=1, high=10000) or 100
    entries = await ops.audit_list(call.admin.store, limit)
    return _json({"entries": [ops.audit_to_dict(entry) for entry in entries]})


async def not_found(call: Call) -> Response:
    path = call.request.url.path
    raise ApiError(404, "not_found", f"no endpoint {path}; see docs/interface.md for the API")


routes = [
    Route("/api/v1/status", endpoint(get_status), methods=["GET"]),
    Route("/api/v1/domains", endpoint(list_domains), methods=["GET"]),
    Route("/api/v1/domains", endpoint(add_domain), methods=["POST"]),
    Route("/api/v1/domains/{domain}", endpoint(get_domain), methods=["GET"]),
    Route("/api/v1/domains/{domain}", endpoint(patch_domain), methods=["PATCH"]),
    Route("/api/v1/domains/{domain}", endpoint(delete_domain), methods=["DELETE"]),
    Route("/api/v1/domains/{domain}/hold", endpoint(hold_domain), methods=["POST"]),
    Route("/api/v1/domains/{domain}/release", endpoint(release_domain), methods=["POST"]),
    Route("/api/v1/messages", endpoint(list_messages), methods=["GET"]),
    Route("/api/v1/messages/{id}", endpoint(get_message), methods=["GET"]),
    Route("/api/v1/messages/{id}/raw", endpoint(raw_message), methods=["GET"]),
    Route("/api/v1/messages/{id}/retry", endpoint(retry_message), methods=["POST"]),
    Route("/api/v1/messages/{id}/discard", endpoint(discard_message), methods=["POST"]),
    Route("/api/v1/parked/retry", endpoint(retry_parked), methods=["POST"]),
    Route("/api/v1/report", endpoint(get_report), methods=["GET"]),
    Route("/api/v1/audit", endpoint(get_audit), methods=["GET"]),
    Route(
        "/api/v1/{rest:path}",
        endpoint(not_found),
        methods=["GET", "POST", "PATCH", "DELETE", "PUT"],
    ),
]
"""Order matters for the last route: unknown /api/v1 paths get a JSON 404 after auth."""
