"""Reading requests safely: capped bodies, JSON only for writes, typed fields.

Bodies are read as a stream and refused (413) as soon as they pass the cap, whatever the
Content-Length claims. Writes must say ``Content-Type: application/json`` (415 otherwise): a
cross-site HTML form cannot send that type, which is half of the CSRF defence.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request

from mxspool.admin.errors import ApiError

MAX_BODY = 64 * 1024
"""Bytes; no admin request needs more (a domain with routes is a few hundred)."""


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"the request body is larger than {limit} bytes")


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


async def read_json(request: Request, limit: int = MAX_BODY) -> dict[str, Any]:
    """The JSON object in the body ({} for an empty body), or the right ApiError."""
    if media_type(request) != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"{request.method} needs 'Content-Type: application/json' and a JSON object body",
        )
    raw = await read_body(request, limit)
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object, e.g. {}")
    return data


class Fields:
    """Typed access to a JSON object's fields; unknown fields are an error (typos show)."""

    def __init__(self, data: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ApiError(
                422,
                "invalid",
                f"unknown field(s) {', '.join(unknown)}; this request takes "
                f"{', '.join(allowed) or 'no fields'}",
            )
        self._data = data

    def given(self, key: str) -> bool:
        return key in self._data and self._data[key] is not None

    def text(self, key: str, default: str | None = None) -> str | None:
        value = self._data.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise ApiError(422, "invalid", f"field {key!r} must be a string")
        return value

    def required_text(self, key: str) -> str:
        value = self.text(key)
        if value is None:
            raise ApiError(422, "invalid", f"field {key!r} is required")
        return value

    def flag(self, key: str, default: bool | None = None) -> bool | None:
        value = self._data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ApiError(422, "invalid", f"field {key!r} must be true or false")
        return value

    def text_list(self, key: str) -> list[str] | None:
        value = self._data.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ApiError(422, "invalid", f"field {key!r} must be a list of strings")
        return list(value)


def query_int(
    request: Request, key: str, default: int | None, low: int = 0, high: int | None = None
) -> int | None:
    text = request.query_params.get(key)
    if text is None or text == "":
        return default
    if not text.isdigit():
        raise ApiError(400, "bad_request", f"query parameter {key!r} must be a whole number")
    value = int(text)
    if value < low or (high is not None and value > high):
        upper = f" and {high}" if high is not None else ""
        raise ApiError(422, "invalid", f"query parameter {key!r} must be between {low}{upper}")
    return value


def query_str(request: Request, key: str) -> str | None:
    value = request.query_params.get(key, "").strip()
    return value or None
