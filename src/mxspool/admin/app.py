"""The admin ASGI application: API, dashboard, static files, /healthz and /metrics."""

from __future__ import annotations

import time
from importlib import resources

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mxspool import metrics
from mxspool.admin import api, dashboard, migration_pages, migrations, readyz
from mxspool.admin.auth import host_policy
from mxspool.admin.context import AdminContext, context_of
from mxspool.admin.errors import ApiError, error_response
from mxspool.admin.hosts import HostPolicy

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
STATIC_TYPES = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8"}


class SecurityHeaders:
    """Headers every response carries; deliberately no Access-Control-* (no CORS at all)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("X-Frame-Options", "DENY")
                # "same-origin", not "no-referrer": with no-referrer browsers send
                # "Origin: null" on form posts, and sign-in checks the Origin.
                headers.setdefault("Referrer-Policy", "same-origin")
                headers.setdefault("Cache-Control", "no-store")
                headers.setdefault("Content-Security-Policy", CSP)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _load_static() -> dict[str, bytes]:
    folder = resources.files("mxspool.admin") / "static"
    return {
        item.name: item.read_bytes()
        for item in folder.iterdir()
        if item.name.rpartition(".")[2] in STATIC_TYPES
    }


class HostCheck:
    """Refuse (421) every request whose Host is not one of the listener's own names."""

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hosts = [value.decode("latin-1") for name, value in scope["headers"] if name == b"host"]
        host = hosts[0] if hosts else None
        if len(hosts) <= 1 and self.policy.allows(host):
            await self.app(scope, receive, send)
            return
        refusal = ApiError(421, "bad_host", self.policy.refusal(host or ""))
        await error_response(refusal)(scope, receive, send)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown path, wrong method) in the API's error envelope."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    code = _HTTP_CODES.get(status, "bad_request" if status < 500 else "internal")
    message = (
        f"{request.method} {request.url.path} is not an endpoint of the admin plane"
        if status in _HTTP_CODES
        else str(getattr(exc, "detail", "") or "the request cannot be served")
    )
    headers = dict(getattr(exc, "headers", None) or {})
    return error_response(ApiError(status, code, message, headers))


def _unprotected(request: Request) -> None:
    """/healthz and /metrics: open on a loopback listener, token (or session) elsewhere."""
    admin = context_of(request)
    if not admin.auth.loopback:
        admin.auth.api_principal(request)


async def healthz(request: Request) -> Response:
    try:
        _unprotected(request)
        await context_of(request).store.domains_generation()
    except ApiError as exc:
        return error_response(exc)
    except Exception as exc:
        return JSONResponse({"status": "unavailable", "error": str(exc)}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics_endpoint(request: Request) -> Response:
    try:
        _unprotected(request)
    except ApiError as exc:
        return error_response(exc)
    admin = context_of(request)
    try:
        metrics.STORE_STATUS.update(await admin.store.status(time.time()))
    except Exception:
        # Counters are still worth scraping; the per-domain gauges show the last good read.
        pass
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


def create_app(admin: AdminContext) -> Starlette:
    static = _load_static()

    async def static_file(request: Request) -> Response:
        name = str(request.path_params["name"])
        body = static.get(name)
        if body is None:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(
            body,
            media_type=STATIC_TYPES[name.rpartition(".")[2]],
            headers={"Cache-Control": "no-cache"},
        )

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz.readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/static/{name}", static_file, methods=["GET"]),
        Route("/favicon.ico", lambda request: Response(status_code=204), methods=["GET"]),
        *migrations.routes,  # before api.routes: its last route is the /api/v1 catch-all
        *api.routes,
        *dashboard.routes,
        *migration_pages.routes,
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(SecurityHeaders),
            Middleware(HostCheck, policy=host_policy(admin.config)),
        ],
        exception_handlers={HTTPException: http_error},
    )
    app.state.admin = admin
    app.state.readyz_probe = readyz.StoreProbe()
    return app
