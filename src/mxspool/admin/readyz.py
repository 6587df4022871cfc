"""``GET /readyz``: whether this node should get traffic, for a load balancer or an orchestrator.

``/healthz`` says the process answers and the store reads. Ready is more: every SMTP listener
accepts, the store commits (a real write through the same writer as intake, and a read), the
delivery loop turns (its heartbeat, ``mxspool.liveness``) and the disk holds more than
``[store] min_free_space`` (below it the intake answers 452 to every message). 200 with each
check when all pass; 503 with the same body, ``failed`` naming the checks that did not.

A balancer may ask many times a second: the store probe, the only check that costs anything,
is shared by every request within ``PROBE_TTL`` (and by concurrent requests while it runs).
Access is that of /healthz: open on a loopback listener, a token elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mxspool import liveness
from mxspool.admin.context import AdminContext, context_of
from mxspool.admin.errors import ApiError, error_response

PROBE_TTL = 1.0
"""Seconds a store probe's result is reused."""
PROBE_TIMEOUT = 5.0
"""A store that takes longer than this to commit the probe is not ready."""
DELIVERY_STALE = 30.0
"""A delivery loop silent this long is stuck (it turns every 0.25 s when healthy)."""
PROBE_BUCKET = "mxspool:readyz"
"""The rate bucket the store probe writes (a pacing row no destination uses)."""


@dataclass(frozen=True, slots=True)
class Check:
    ok: bool
    detail: str


class StoreProbe:
    """A write and a read, at most once per PROBE_TTL, shared by concurrent callers."""

    def __init__(self) -> None:
        self._at = -PROBE_TTL
        self._result = Check(False, "not probed yet")
        self._lock = asyncio.Lock()

    async def check(self, admin: AdminContext) -> Check:
        async with self._lock:
            if time.monotonic() - self._at >= PROBE_TTL:
                self._result = await self._probe(admin)
                self._at = time.monotonic()
            return self._result

    @staticmethod
    async def _probe(admin: AdminContext) -> Check:
        started = time.monotonic()
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                # A real commit through the store's writer (the one intake uses), then a read.
                await admin.store.take_tokens(PROBE_BUCKET, 1e9, 1.0, 1, time.time())
                await admin.store.domains_generation()
        except TimeoutError:
            return Check(False, f"the store did not commit within {PROBE_TIMEOUT:g} s")
        except Exception as exc:
            return Check(False, f"the store failed a write/read probe: {exc}")
        return Check(True, f"write and read in {(time.monotonic() - started) * 1000:.1f} ms")


def _listeners() -> Check:
    accepting = liveness.NODE.listeners
    if accepting is None:
        return Check(False, "the SMTP listeners are not started")
    if not accepting():
        return Check(False, "an SMTP listener is closed")
    return Check(True, "every SMTP listener accepts")


def _delivery() -> Check:
    age = liveness.NODE.age("delivery")
    if age is None:
        return Check(False, "the delivery loop has not run yet")
    if age > DELIVERY_STALE:
        return Check(False, f"the delivery loop last turned {age:.0f} s ago (stuck?)")
    return Check(True, f"the delivery loop turned {age:.1f} s ago")


def _disk(admin: AdminContext) -> Check:
    free = admin.store.free_bytes()
    minimum = admin.config.store.min_free_space
    if free is None:
        return Check(True, "the store does not report free space (PostgreSQL)")
    if free < minimum:
        return Check(
            False,
            f"{free} bytes free, below [store] min_free_space ({minimum}): intake answers 452",
        )
    return Check(True, f"{free} bytes free, min_free_space {minimum}")


async def readyz(request: Request) -> Response:
    admin = context_of(request)
    try:
        if not admin.auth.loopback:
            admin.auth.api_principal(request)
    except ApiError as exc:
        return error_response(exc)
    probe: StoreProbe = request.app.state.readyz_probe
    checks = {
        "listeners": _listeners(),
        "store": await probe.check(admin),
        "delivery": _delivery(),
        "disk": _disk(admin),
    }
    failed = [name for name, check in checks.items() if not check.ok]
    body = {
        "status": "not ready" if failed else "ready",
        "failed": failed,
        "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in checks.items()},
    }
    return JSONResponse(body, status_code=503 if failed else 200)
