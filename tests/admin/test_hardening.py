"""Admin plane hardening (issue 14 items 5 and 7): Host checks and bad parameters.

Item 5: a web page can reach the admin listener through DNS rebinding, with its own name in the
Host header; every route, /metrics and /healthz included, token or no token, refuses a Host that
is not one of the listener's names. Item 7: bad parameters and bodies are 4xx errors in the
API's envelope, never a 500. In-process (app + a real SQLite store), plus one real node.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from mxspool.admin import AdminConfigError, check_config, create_app
from mxspool.admin.auth import Auth, load_tokens
from mxspool.admin.context import AdminContext
from mxspool.admin.history import History
from mxspool.config import AdminConfig, Config, SmtpConfig, split_host_port
from mxspool.store.sqlite import SqliteStore
from tests.admin.conftest import AdminNode
from tests.test_operations import put_message

TOKEN = "t0ken-for-hardening"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    spool = SqliteStore(f"sqlite:///{tmp_path / 'spool.db'}")
    await spool.open()
    yield spool
    await spool.close()


def app_for(store: SqliteStore, **admin: Any) -> Starlette:
    config = Config(
        admin=AdminConfig(**{"listen": "127.0.0.1:8025", **admin}),
        smtp=SmtpConfig(hostname="mx.example.net"),
    )
    host, _port = split_host_port(config.admin.listen)
    auth = Auth(load_tokens(config.admin), loopback=host.startswith("127."))
    return create_app(AdminContext(config, store, auth, History()))


def client_for(store: SqliteStore, **admin: Any) -> httpx.AsyncClient:
    # In process (ASGI): nothing binds. The requests name the loopback listener unless a test
    # sets its own Host header.
    transport = httpx.ASGITransport(app=app_for(store, **admin))
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8025")


def assert_envelope(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str)
    assert error["message"]


# -- item 5: Host on every route ------------------------------------------------------------

ROUTES = ("/metrics", "/healthz", "/api/v1/status", "/", "/login", "/static/app.js", "/nope")


@pytest.mark.parametrize("token", ["", TOKEN], ids=["no-token", "token"])
async def test_rebound_host_is_refused_on_every_route(store: SqliteStore, token: str) -> None:
    async with client_for(store, token=token) as client:
        for path in ROUTES:
            for host in ("evil.example", "evil.example:8025", "127.0.0.1.evil.example:8025"):
                refused = await client.get(path, headers={"Host": host, **BEARER})
                assert_envelope(refused, 421, "bad_host")
                assert "allowed_hosts" in refused.json()["error"]["message"]
                assert refused.headers["x-frame-options"] == "DENY"
        # Positive control: the right Host reads the metrics (a loopback listener needs no
        # token for them) and the API (with the token when one is configured).
        metrics = await client.get("/metrics", headers={"Host": "127.0.0.1:8025"})
        assert metrics.status_code == 200
        assert "mxspool_" in metrics.text
        status = await client.get("/api/v1/status", headers={"Host": "localhost:8025", **BEARER})
        assert status.status_code == 200


async def test_allowed_names(store: SqliteStore) -> None:
    admin = {"token": TOKEN, "allowed_hosts": ["admin.example.org", "proxy.example.org:8443"]}
    async with client_for(store, **admin) as client:
        allowed = (
            "127.0.0.1:8025",
            "127.0.0.1",  # a local reverse proxy may drop the port
            "localhost:8025",
            "LOCALHOST.:8025",
            "[::1]:8025",
            "[0:0::1]:8025",
            "mx.example.net:8025",  # [smtp] hostname
            "admin.example.org",  # allowed_hosts, any port
            "admin.example.org:443",
            "proxy.example.org:8443",
        )
        for host in allowed:
            response = await client.get("/metrics", headers={"Host": host})
            assert response.status_code == 200, host
        refused = (
            "localhost:9999",  # own names only with the listen port
            "mx.example.net:80",
            "proxy.example.org:9999",
            "proxy.example.org",
            "example.org:8025",
            "evil.example:8025@127.0.0.1",
            "[::1",
            "127.0.0.1:\u00b2",  # "²".isdigit() is True
            "127.0.0.1:99999",
            "",
            "192.0.2.7:8025",  # an IP literal only for a wildcard listener
        )
        for host in refused:
            raw = [(b"host", host.encode("latin-1"))]
            response = await client.get("/metrics", headers=raw)
            assert_envelope(response, 421, "bad_host")


async def test_duplicate_host_headers_are_refused(store: SqliteStore) -> None:
    app = app_for(store)
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    for hosts, expected in (([b"127.0.0.1:8025"], 200), ([b"127.0.0.1:8025", b"evil"], 421)):
        sent.clear()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/metrics",
            "raw_path": b"/metrics",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", host) for host in hosts],
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 8025),
        }
        await app(scope, receive, send)
        assert sent[0]["status"] == expected


WILDCARD = ".".join(["0"] * 4) + ":8025"  # the configuration of a wildcard listener; not bound


async def test_wildcard_listener_accepts_ip_literals(store: SqliteStore) -> None:
    async with client_for(store, listen=WILDCARD, token=TOKEN) as client:
        for host in ("192.0.2.7:8025", "[2001:db8::7]:8025", "mx.example.net:8025"):
            response = await client.get("/api/v1/status", headers={"Host": host, **BEARER})
            assert response.status_code == 200, host
        for host in ("evil.example:8025", "192.0.2.7:8026"):
            response = await client.get("/api/v1/status", headers={"Host": host, **BEARER})
            assert_envelope(response, 421, "bad_host")


def test_bad_allowed_hosts_entry_is_a_config_error() -> None:
    check_config(Config(admin=AdminConfig(allowed_hosts=["a.example", "[::1]:8443"])))
    for entry in ("https://a.example", "a.example/admin", "a.example:http", "user@a.example"):
        with pytest.raises(AdminConfigError, match="allowed_hosts"):
            check_config(Config(admin=AdminConfig(allowed_hosts=[entry])))


def test_a_real_node_refuses_a_rebound_host(admin_node: AdminNode) -> None:
    """Over uvicorn and TCP: /metrics with a token configured, loopback listener."""
    with httpx.Client(base_url=admin_node.url, timeout=10) as client:
        refused = client.get("/metrics", headers={"Host": "evil.example"})
        assert_envelope(refused, 421, "bad_host")
        refused = client.get("/healthz", headers={"Host": f"evil.example:{admin_node.admin_port}"})
        assert_envelope(refused, 421, "bad_host")
        assert client.get("/metrics").status_code == 200  # Host: 127.0.0.1:<port>


# -- item 7: bad parameters are 4xx in the envelope -----------------------------------------


async def test_bad_query_parameters_are_422(store: SqliteStore) -> None:
    await put_message(store, "user@dest.test")
    async with client_for(store) as client:
        for path in (
            "/api/v1/messages?limit=%C2%B2",  # "²".isdigit() is True
            "/api/v1/messages?limit=%D9%A3",  # Arabic-Indic three
            "/api/v1/messages?limit=0",
            "/api/v1/messages?limit=-1",
            "/api/v1/messages?limit=1001",
            "/api/v1/messages?limit=" + "9" * 5000,
            "/api/v1/messages?cursor=" + "9" * 30,  # overflowed SQLite's INTEGER
            "/api/v1/messages?cursor=9223372036854775808",
            "/api/v1/messages?q=a%00b",
            "/api/v1/messages?domain=" + "a" * 2000,
            "/api/v1/messages?state=nope",
            "/api/v1/audit?limit=%C2%B2",
            "/api/v1/report?format=xlsx",
            "/api/v1/domains/a%00b.test",
            "/api/v1/messages/a%01b",
            "/api/v1/messages/" + "x" * 2000,
        ):
            assert_envelope(await client.get(path), 422, "invalid")
        assert_envelope(
            await client.delete("/api/v1/domains/dest.test?force=maybe", headers=_json()),
            422,
            "invalid",
        )
        # Positive controls: the largest cursor and the same parameters well formed.
        ok = await client.get("/api/v1/messages?cursor=9223372036854775807&limit=1000")
        assert ok.status_code == 200
        assert ok.json()["messages"] == []
        first = await client.get("/api/v1/messages?limit=1&cursor=0&q=user")
        assert [row["rcpt"] for row in first.json()["messages"]] == ["user@dest.test"]
        assert (await client.get("/messages?cursor=" + "9" * 30)).status_code == 422


def _json() -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json")]


async def test_bad_bodies_are_4xx(store: SqliteStore) -> None:
    async with client_for(store) as client:

        async def post(
            body: bytes, headers: list[tuple[bytes, bytes]] | None = None
        ) -> httpx.Response:
            return await client.post("/api/v1/domains", content=body, headers=headers or _json())

        assert_envelope(await post(b"[" * 30000 + b"]" * 30000), 422, "invalid")
        assert_envelope(await post(b'{"a":' * 9 + b"1" + b"}" * 9), 422, "invalid")
        assert_envelope(await post(b'{"domain": ' + b"1" * 5000 + b"}"), 400, "bad_json")
        assert_envelope(await post(b'{"\\ud800": 1}'), 400, "bad_json")
        assert_envelope(await post(b'{"domain": "\\udfff.test"}'), 400, "bad_json")
        assert_envelope(await post(b"\xff\xfe{}"), 400, "bad_json")
        assert_envelope(await post(b"{" * 70000), 413, "too_large")
        length = [(b"content-type", b"application/json"), (b"content-length", b"\xb2")]
        assert_envelope(await post(b"{}", length), 400, "bad_request")
        # "[[[" inside a string is not nesting.
        quoted = json.dumps({"domain": "[[[[[[[[[[[[.test", "routes": ["mx.test"]}).encode()
        assert_envelope(await post(quoted), 422, "invalid")
        # Positive control: a body nested to the allowed depth is read and acted on.
        good = json.dumps({"domain": "ok.test", "routes": ["mx.test"]}).encode()
        assert (await post(good)).status_code == 201


async def test_unknown_methods_and_paths_use_the_envelope(store: SqliteStore) -> None:
    async with client_for(store) as client:
        assert_envelope(
            await client.request("OPTIONS", "/api/v1/status"), 405, "method_not_allowed"
        )
        assert_envelope(await client.post("/metrics"), 405, "method_not_allowed")
        assert_envelope(await client.get("/no/such/page"), 404, "not_found")
        assert_envelope(await client.get("/api/v1/nothing"), 404, "not_found")


async def test_sign_in_page_with_a_mangled_next(store: SqliteStore) -> None:
    async with client_for(store, token=TOKEN) as client:
        for next_url in ("/%00", "/" + "a" * 5000, "/messages?cursor=1"):
            page = await client.get("/login", params={"next": next_url})
            assert page.status_code == 200, next_url
        assert 'value="/messages?cursor=1"' in page.text  # positive control: kept when sane
