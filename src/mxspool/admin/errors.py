"""The admin plane's errors and how each maps to an HTTP status and a JSON error body.

Handlers raise :class:`ApiError` (or let the operations' own exceptions through);
``error_response`` turns any of them into ``{"error": {"code": ..., "message": ...}}``, so
scripts can branch on ``code`` and operators can read ``message``.
"""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse

from mxspool.operations import OperationError
from mxspool.store.base import Conflict, NotFound, StoreError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the admin plane answers with an error status."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def unauthorized(message: str = "") -> ApiError:
    return ApiError(
        401,
        "unauthorized",
        message or "send 'Authorization: Bearer <token>' with the token of [admin] token",
        {"WWW-Authenticate": 'Bearer realm="mxspool"'},
    )


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


def as_api_error(exc: Exception) -> ApiError:
    """The ApiError for any exception a handler let through."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, OperationError):
        return ApiError(422, "invalid", str(exc))
    if isinstance(exc, NotFound):
        return ApiError(404, "not_found", str(exc))
    if isinstance(exc, Conflict):
        return ApiError(409, "conflict", str(exc))
    if isinstance(exc, StoreError):
        log.error("admin request failed on the store: %s", exc)
        return ApiError(503, "store_unavailable", str(exc))
    log.exception("admin request failed", exc_info=exc)
    return ApiError(500, "internal", "internal error; the node's log has the details")


def error_response(error: ApiError) -> JSONResponse:
    # A message may quote the request; what cannot be UTF-8 (a lone surrogate) is escaped.
    message = error.message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse(
        {"error": {"code": error.code, "message": message}},
        status_code=error.status,
        headers=error.headers,
    )
