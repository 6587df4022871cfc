"""The /api/v1/migrations endpoints: ``mxspool migration ...`` over HTTP.

Each handler is a thin shell over :mod:`mxspool.migrate.migration` (the functions the CLI
calls, with the caller's token name as the audit actor), through the API's own plumbing
(``api.endpoint``: authentication, JSON bodies with known fields only, the error envelope, 422
for invalid input), so a migration acts and audits the same from either front end.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mxspool import operations as ops
from mxspool.admin.api import Call, _max_size, endpoint, report_response
from mxspool.admin.errors import ApiError
from mxspool.admin.requests import Fields, query_choice, query_str
from mxspool.migrate import migration as mig
from mxspool.migrate import releaseplan


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status)


async def list_migrations(call: Call) -> Response:
    views = await mig.list_views(call.admin.store)
    return _json({"migrations": [mig.view_to_dict(item) for item in views]})


async def create_migration(call: Call) -> Response:
    fields = Fields(call.body, ("name", "domains", "source_tenant", "target_tenant"))
    made = await mig.create(
        call.admin.store,
        fields.required_text("name"),
        fields.text_list("domains") or [],
        source_tenant=fields.text("source_tenant"),
        target_tenant=fields.text("target_tenant"),
        actor=call.actor,
    )
    return _json(mig.migration_to_dict(made), 201)


async def get_migration(call: Call) -> Response:
    return _json(mig.view_to_dict(await mig.show(call.admin.store, call.path("name"))))


async def delete_migration(call: Call) -> Response:
    Fields(call.body, ())
    gone = await mig.remove(call.admin.store, call.path("name"), actor=call.actor)
    return _json({"removed": gone.name})


async def add_domains(call: Call) -> Response:
    fields = Fields(call.body, ("domains",))
    made = await mig.change_domains(
        call.admin.store, call.path("name"), add=fields.text_list("domains") or [], actor=call.actor
    )
    return _json(mig.migration_to_dict(made))


async def remove_domains(call: Call) -> Response:
    fields = Fields(call.body, ("domains",))
    made = await mig.change_domains(
        call.admin.store,
        call.path("name"),
        remove=fields.text_list("domains") or [],
        actor=call.actor,
    )
    return _json(mig.migration_to_dict(made))


async def hold(call: Call) -> Response:
    Fields(call.body, ())
    held = await mig.hold(call.admin.store, call.path("name"), actor=call.actor)
    return _json({"domains": [ops.domain_to_dict(d) for d in held]})


async def release(call: Call) -> Response:
    fields = Fields(call.body, ("rate", "only", "at", "cancel", "dry_run"))
    if fields.flag("dry_run", False):
        others = [key for key in ("only", "at") if fields.given(key)]
        others += ["cancel"] if fields.flag("cancel", False) else []
        if others:
            raise ApiError(
                422, "invalid", f"dry_run plans the whole release; leave out {', '.join(others)}"
            )
        plan = await mig.release_plan(
            call.admin.store, call.admin.config, call.path("name"), rate=fields.text("rate")
        )
        return _json(releaseplan.plan_to_dict(plan))
    outcome = await mig.release(
        call.admin.store,
        call.path("name"),
        rate=fields.text("rate"),
        only=fields.text("only"),
        at=fields.text("at"),
        cancel=bool(fields.flag("cancel", False)),
        actor=call.actor,
    )
    canary = outcome.canary
    return _json(
        {
            "domains": [ops.domain_to_dict(d) for d in outcome.domains],
            "rate_per_s": outcome.rate,
            "scheduled_at": ops.iso_time(outcome.scheduled_at),
            "cancelled": outcome.cancelled,
            "canary": canary.canary if canary is not None else None,
            "released_recipients": canary.released_recipients if canary is not None else 0,
        }
    )


_ROUTE_FIELDS = ("routes", "mx", "tls", "profile", "max_size", "subdomains", "plus_separator")


async def route(call: Call) -> Response:
    fields = Fields(call.body, _ROUTE_FIELDS)
    if not any(fields.given(key) for key in _ROUTE_FIELDS):
        raise ApiError(422, "invalid", f"nothing to change; give {', '.join(_ROUTE_FIELDS)}")
    request = ops.RouteRequest(
        fields.text_list("routes"),
        fields.flag("mx"),
        fields.text("tls"),
        fields.text("profile"),
        _max_size(call.body, fields),
        fields.flag("subdomains"),
        fields.text("plus_separator"),
    )
    updated = await mig.route(call.admin.store, call.path("name"), request, actor=call.actor)
    return _json({"domains": [ops.domain_to_dict(d) for d in updated]})


async def step(call: Call) -> Response:
    fields = Fields(call.body, ("domain", "step", "note"))
    event = await mig.step(
        call.admin.store,
        call.path("name"),
        fields.required_text("domain"),
        fields.required_text("step"),
        fields.text("note") or "",
        actor=call.actor,
    )
    return _json(mig.event_to_dict(event), 201)


async def report(call: Call) -> Response:
    """The migration's ledger, streamed: JSON (default) or CSV, a domain column first."""
    fmt = query_choice(call.request, "format", ("json", "csv"), "json")
    rows = mig.report(call.admin.store, call.path("name"))  # unknown: a 404 at the first row
    return await report_response(rows, mig.REPORT_COLUMNS, fmt)


_RUNBOOK_TYPES = {"md": "text/markdown; charset=utf-8", "ps1": "text/plain; charset=utf-8"}


async def runbook(call: Call) -> Response:
    """The migration's runbook: ``?spooler_host=&spooler_ip=`` required, ``format=md|ps1``,
    ``source_initial``/``target_initial`` optional (as ``migration runbook``)."""
    request = call.request
    fmt = query_choice(request, "format", tuple(_RUNBOOK_TYPES), "md")
    spooler_host = query_str(request, "spooler_host")
    spooler_ip = query_str(request, "spooler_ip")
    if not spooler_host or not spooler_ip:
        raise ApiError(
            422,
            "invalid",
            "give the query parameters spooler_host (the spooler's MX host name) and "
            "spooler_ip (its public IPv4 address)",
        )
    text = await mig.runbook(
        call.admin.store,
        call.admin.config,
        call.path("name"),
        spooler_host=spooler_host,
        spooler_ip=spooler_ip,
        source_initial=query_str(request, "source_initial"),
        target_initial=query_str(request, "target_initial"),
        fmt=fmt,
        actor=call.actor,
    )
    return Response(text, media_type=_RUNBOOK_TYPES[fmt])


_BASE = "/api/v1/migrations"
routes = [
    Route(_BASE, endpoint(list_migrations), methods=["GET"]),
    Route(_BASE, endpoint(create_migration), methods=["POST"]),
    Route(_BASE + "/{name}", endpoint(get_migration), methods=["GET"]),
    Route(_BASE + "/{name}", endpoint(delete_migration), methods=["DELETE"]),
    Route(_BASE + "/{name}/domains", endpoint(add_domains), methods=["POST"]),
    Route(_BASE + "/{name}/domains", endpoint(remove_domains), methods=["DELETE"]),
    Route(_BASE + "/{name}/hold", endpoint(hold), methods=["POST"]),
    Route(_BASE + "/{name}/release", endpoint(release), methods=["POST"]),
    Route(_BASE + "/{name}/route", endpoint(route), methods=["POST"]),
    Route(_BASE + "/{name}/steps", endpoint(step), methods=["POST"]),
    Route(_BASE + "/{name}/report", endpoint(report), methods=["GET"]),
    Route(_BASE + "/{name}/runbook", endpoint(runbook), methods=["GET"]),
]
"""Mounted before ``api.routes`` (whose last route answers unknown /api/v1 paths)."""
