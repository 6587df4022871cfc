"""Reading requests safely: the one place query, path and body values are parsed.

Bodies are read as a stream and refused (413) as soon as they pass the cap, whatever the
Content-Length claims. Writes must say ``Content-Type: application/json`` (415 otherwise): a
cross-site HTML form cannot send that type, which is half of the CSRF defence. JSON nested
deeper than MAX_DEPTH, or holding text that is not valid Unicode, is refused before anything
reads it.

Every query and path parameter goes through ``query_*`` and ``path_text``: numbers are ASCII
digits within the store's 64-bit range, text is bounded and has no control characters, and
anything else is a 422 saying which parameter and what it takes, never a 500.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request

from mxspool.admin.errors import ApiError

MAX_BODY = 64 * 1024
"""Bytes; no admin request needs more (a domain with routes is a few hundred)."""
MAX_DEPTH = 8
"""JSON nesting; admin bodies are an object holding lists of strings (depth 2)."""
MAX_TEXT = 1024
"""Characters in one query or path parameter (an address or a search is far shorter)."""
MAX_ID = 2**63 - 1
"""The largest id the stores hold (SQLite INTEGER, PostgreSQL bigint)."""

_DIGITS = re.compile(r"[0-9]{1,19}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_OPENERS = frozenset("[{")
_CLOSERS = frozenset("]}")


def invalid(message: str) -> ApiError:
    return ApiError(422, "invalid", message)


def whole_number(text: str) -> int | None:
    """``text`` as a non-negative integer of ASCII digits ("²" is not one), else None."""
    return int(text) if _DIGITS.fullmatch(text) else None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"the request body is larger than {limit} bytes")


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        size_declared = whole_number(declared.strip())
        if size_declared is None:
            raise ApiError(400, "bad_request", "Content-Length is not a number")
        if size_declared > limit:
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
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "bad_json", f"the body is not UTF-8: {exc}") from None
    depth = json_depth(text)
    if depth > MAX_DEPTH:
        raise invalid(f"the JSON body is nested {depth} levels deep; at most {MAX_DEPTH}")
    try:
        data = json.loads(text)
        # An unpaired surrogate escape decodes, but cannot be stored or sent back.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(
            400, "bad_json", "the body holds an unpaired \\uD800-\\uDFFF escape"
        ) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, or a 5000-digit number
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object, e.g. {}")
    return data


def json_depth(text: str) -> int:
    """How deeply ``text``'s arrays and objects nest: one linear pass, no recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in _OPENERS:
            depth += 1
            deepest = max(deepest, depth)
        elif char in _CLOSERS:
            depth -= 1
    return deepest


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
    request: Request, key: str, default: int | None, low: int = 0, high: int = MAX_ID
) -> int | None:
    """A whole-number query parameter in [low, high]; ``default`` when absent or empty."""
    text = request.query_params.get(key)
    if text is None or text.strip() == "":
        return default
    value = whole_number(text.strip())
    if value is None or not low <= value <= high:
        raise invalid(f"query parameter {key!r} must be a whole number from {low} to {high}")
    return value


def _checked_text(what: str, value: str) -> str:
    if len(value) > MAX_TEXT:
        raise invalid(f"{what} is longer than {MAX_TEXT} characters")
    if _CONTROL.search(value):
        raise invalid(f"{what} holds a control character")
    return value


def query_str(request: Request, key: str, default: str | None = None) -> str | None:
    """A text query parameter, stripped; ``default`` when absent or blank."""
    value = _checked_text(f"query parameter {key!r}", request.query_params.get(key, "")).strip()
    return value or default


def query_choice(request: Request, key: str, choices: tuple[str, ...], default: str) -> str:
    """One of ``choices`` (case-insensitive); ``default`` when absent."""
    value = (query_str(request, key) or default).lower()
    if value not in choices:
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise invalid(f"query parameter {key!r} is {shown!r}; use one of {', '.join(choices)}")
    return value


_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")


def query_flag(request: Request, key: str) -> bool:
    """A yes/no query parameter; absent is no."""
    value = query_choice(request, key, _TRUE + _FALSE, "no")
    return value in _TRUE


def path_text(request: Request, key: str) -> str:
    """A path parameter (a domain name, a queue id), bounded and without control characters."""
    return _checked_text(f"the {key} in the path", str(request.path_params[key]))
