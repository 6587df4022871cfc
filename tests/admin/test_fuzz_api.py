"""Fuzzing the admin plane's query, path and body parsing (issue 14 item 7) with hypothesis.

Whatever the request, the answer is below 500, and an error (>= 400) from the API, /metrics or
/healthz is the JSON envelope ``{"error": {"code", "message"}}``. In-process over httpx's ASGI
transport, against a real SQLite store in tmp_path (and a PostgreSQL one, see
tests/store/conftest.py), seeded with a domain and a message so that paths reach real rows.

The default run is short; ``MXSPOOL_FUZZ_EXAMPLES=20000`` (for each store) runs a long one.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxspool import operations as ops
from mxspool.admin import create_app
from mxspool.admin.auth import Auth, load_tokens
from mxspool.admin.context import AdminContext
from mxspool.admin.history import History
from mxspool.config import AdminConfig, Config
from mxspool.store import create_store
from mxspool.store.base import Store
from tests.store.conftest import pg_server, pg_url  # noqa: F401  (fixtures)
from tests.test_operations import put_message

SQLITE_EXAMPLES = 250
PG_EXAMPLES = 80
LONG = int(os.environ.get("MXSPOOL_FUZZ_EXAMPLES", "0"))

DOMAIN = "dest.test"

# (method, path template): {domain} and {id} are filled from the strategy below.
ENDPOINTS = (
    ("GET", "/api/v1/status"),
    ("GET", "/api/v1/domains"),
    ("POST", "/api/v1/domains"),
    ("GET", "/api/v1/domains/{domain}"),
    ("PATCH", "/api/v1/domains/{domain}"),
    ("DELETE", "/api/v1/domains/{domain}"),
    ("POST", "/api/v1/domains/{domain}/hold"),
    ("POST", "/api/v1/domains/{domain}/release"),
    ("GET", "/api/v1/messages"),
    ("GET", "/api/v1/messages/{id}"),
    ("GET", "/api/v1/messages/{id}/raw"),
    ("POST", "/api/v1/messages/{id}/retry"),
    ("POST", "/api/v1/messages/{id}/discard"),
    ("POST", "/api/v1/parked/retry"),
    ("GET", "/api/v1/report"),
    ("GET", "/api/v1/audit"),
    ("PUT", "/api/v1/{domain}"),
    ("GET", "/metrics"),
    ("GET", "/healthz"),
    ("GET", "/"),
    ("GET", "/messages"),
    ("GET", "/messages/{id}"),
    ("GET", "/domains/{domain}"),
    ("GET", "/parked"),
    ("GET", "/audit"),
    ("GET", "/login"),
    ("POST", "/login"),
)
HTML_PAGES = ("/", "/messages", "/domains/", "/parked", "/audit", "/login")
QUERY_KEYS = ("limit", "cursor", "q", "state", "domain", "format", "force", "next")
FIELDS = ("domain", "routes", "mx", "tls", "hold", "profile", "rate", "only", "force")

NASTY = (
    "\u00b2",
    "\u0663",
    "-1",
    "0",
    "1",
    "9" * 30,
    "9223372036854775807",
    "9223372036854775808",
    "1e3",
    " 5 ",
    "\x00",
    "a\x00b",
    "\r\n",
    "NaN",
    "true",
    "csv",
    "JSON",
    "parked",
    DOMAIN,
    "user@" + DOMAIN,
    "600/min",
    "a" * 2000,
    "%",
    "../..",
    "[::1]",
    "xn--",
    "\u202e",
    "\U0001f600",
)

text = st.one_of(
    st.sampled_from(NASTY),
    st.text(st.characters(codec="utf-8"), max_size=40),
    st.from_regex(r"[0-9]{1,25}", fullmatch=True),
)
raw_bytes = st.binary(max_size=40).map(lambda data: "".join(f"%{b:02X}" for b in data))
"""Percent-escaped bytes: invalid UTF-8 and controls reach the server as they are."""

json_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | text,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(FIELDS) | text, children, max_size=3)
    ),
    max_leaves=12,
)

bodies = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), json_value, max_size=4).map(
        lambda data: json.dumps(data).encode()
    ),
    json_value.map(lambda data: json.dumps(data).encode()),
    st.binary(max_size=200),
    st.integers(1, 40000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1, 40000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    st.sampled_from(
        [
            b'{"domain": "\\ud800.test"}',
            b'{"\\udfff": 1}',
            b'{"domain": ' + b"7" * 5000 + b"}",
            b'{"routes": ["mx.test", "\\u0000"]}',
            b"token=x&next=//evil.example",
            b"",
        ]
    ),
)
content_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/x-www-form-urlencoded",
        "text/plain",
        "",
    ]
)


@dataclass(frozen=True)
class Probe:
    method: str
    path: str
    query: str
    body: bytes
    content_type: str


@st.composite
def probes(draw: st.DrawFn, queue_id: str) -> Probe:
    method, template = draw(st.sampled_from(ENDPOINTS))
    path = template
    for key, real in (("{domain}", DOMAIN), ("{id}", queue_id)):
        if key in path:
            value = draw(
                st.one_of(st.just(quote(real)), text.map(lambda v: quote(v, safe="")), raw_bytes)
            )
            path = path.replace(key, value)
    pairs = draw(
        st.lists(
            st.tuples(
                st.sampled_from(QUERY_KEYS) | text.map(lambda v: quote(v, safe="")),
                text.map(lambda v: quote(v, safe="")) | raw_bytes,
            ),
            max_size=4,
        )
    )
    query = "&".join(f"{key}={value}" for key, value in pairs)
    body = draw(bodies) if method in ("POST", "PATCH", "DELETE", "PUT") else b""
    return Probe(method, path, query, body, draw(content_types))


def _check(probe: Probe, response: httpx.Response) -> None:
    where = f"{probe.method} {probe.path}?{probe.query[:200]} body={probe.body[:200]!r}"
    assert response.status_code < 500, f"{where} -> {response.status_code} {response.text[:300]}"
    if response.status_code < 400:
        return
    path = probe.path.split("?", 1)[0]
    if probe.path != "/" and not path.startswith(HTML_PAGES[1:]):
        assert response.headers["content-type"].startswith("application/json"), where
        error = response.json()["error"]
        assert isinstance(error["code"], str), where
        assert isinstance(error["message"], str), where
        assert error["message"], where


async def _seed(store: Store) -> str:
    await ops.add_domain(store, DOMAIN, ["mx.dest.test"], hold=True)
    queue_id = await put_message(store, f"user@{DOMAIN}", mail_from="=1+1@src.test")
    await put_message(store, f"-1+1@{DOMAIN}", mail_from="sender@src.test")
    return queue_id


TOKEN = "fuzz-token"


def _fuzz(url: str, examples: int, token: str = "") -> None:
    """``examples`` requests; with a token, about half of them carry it."""
    seen: Counter[int] = Counter()
    with asyncio.Runner() as runner:
        store = create_store(url)
        runner.run(store.open())
        try:
            queue_id = runner.run(_seed(store))
            admin = AdminConfig(token=token)
            context = AdminContext(
                Config(admin=admin), store, Auth(load_tokens(admin), True), History()
            )
            transport = httpx.ASGITransport(app=create_app(context))
            client = httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8025")

            async def send(probe: Probe, bearer: bool) -> httpx.Response:
                headers = {"Content-Type": probe.content_type} if probe.content_type else {}
                if bearer:
                    headers["Authorization"] = f"Bearer {token}"
                url = probe.path + (f"?{probe.query}" if probe.query else "")
                return await client.request(
                    probe.method, url, content=probe.body or None, headers=headers
                )

            @settings(
                max_examples=LONG or examples,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(probes(queue_id), st.booleans())
            def one(probe: Probe, bearer: bool) -> None:
                response = runner.run(send(probe, bearer and bool(token)))
                seen[response.status_code // 100] += 1
                _check(probe, response)

            one()
            runner.run(client.aclose())
        finally:
            runner.run(store.close())
    # The fuzzing reached handlers, not only the error paths.
    assert seen[2] > 0 and seen[4] > 0, seen


@pytest.mark.parametrize("token", ["", TOKEN], ids=["open", "token"])
def test_fuzz_api_sqlite(tmp_path: Path, token: str) -> None:
    _fuzz(f"sqlite:///{tmp_path / 'spool.db'}", SQLITE_EXAMPLES, token)


def test_fuzz_api_postgres(pg_url: str) -> None:  # noqa: F811
    _fuzz(pg_url, PG_EXAMPLES, TOKEN)
