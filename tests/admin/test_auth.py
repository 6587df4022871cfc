"""Admin configuration safety and token handling, in-process (app + a real SQLite store)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from mxspool.admin import AdminConfigError, admin_component, check_config, create_app
from mxspool.admin.auth import Auth, load_tokens
from mxspool.admin.context import AdminContext
from mxspool.admin.history import History
from mxspool.config import AdminConfig, Config
from mxspool.store.sqlite import SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    spool = SqliteStore(f"sqlite:///{tmp_path / 'spool.db'}")
    await spool.open()
    yield spool
    await spool.close()


def _client(store: SqliteStore, admin: AdminConfig, loopback: bool = True) -> httpx.AsyncClient:
    config = Config(admin=admin)
    context = AdminContext(config, store, Auth(load_tokens(admin), loopback), History())
    transport = httpx.ASGITransport(app=create_app(context))
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8025")


# Any address that is not loopback needs a token. Test servers bind loopback only, so the
# component itself is tried with a TEST-NET address that no machine has: even a broken check
# could not open a listener off loopback.
@pytest.mark.parametrize("listen", ["192.0.2.1:8025", "[2001:db8::1]:8025", "mx.example.net:8025"])
def test_refuses_a_public_address_without_a_token(listen: str) -> None:
    with pytest.raises(AdminConfigError, match="without a token"):
        check_config(Config(admin=AdminConfig(listen=listen)))
    check_config(Config(admin=AdminConfig(listen=listen, token="t0ken")))


async def test_component_refuses_to_start_without_a_token(store: SqliteStore) -> None:
    config = Config(admin=AdminConfig(listen="192.0.2.1:8025"))
    with pytest.raises(AdminConfigError, match=r"set \[admin\] token"):
        await admin_component(config, store, None)


async def test_loopback_without_token_is_allowed(store: SqliteStore) -> None:
    for listen in ("127.0.0.1:8025", "localhost:8025", "[::1]:8025"):
        check_config(Config(admin=AdminConfig(listen=listen)))


async def test_token_file(tmp_path: Path, store: SqliteStore) -> None:
    missing = AdminConfig(listen="192.0.2.1:1", token_file=str(tmp_path / "nope"))
    with pytest.raises(AdminConfigError, match="cannot read"):
        check_config(Config(admin=missing))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(AdminConfigError, match="empty"):
        load_tokens(AdminConfig(token_file=str(empty)))
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    admin = AdminConfig(token="inline", token_file=str(token_file))
    async with _client(store, admin) as client:
        for token, actor in (("inline", "api"), ("from-a-file", "token")):
            response = await client.post(
                "/api/v1/domains",
                json={"domain": f"{actor}.test", "routes": ["mx.test"]},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert response.status_code == 201
            entries = await store.list_audit(1)
            assert (entries[0].actor, entries[0].target) == (actor, f"{actor}.test")
        wrong = await client.get("/api/v1/status", headers={"Authorization": "Bearer inlinex"})
        assert wrong.status_code == 401


async def test_open_api_answers_only_to_loopback_host_names(store: SqliteStore) -> None:
    async with _client(store, AdminConfig()) as client:
        assert (await client.get("/api/v1/status")).status_code == 200
        for host in ("localhost:8025", "[::1]:8025", "127.0.0.1"):
            response = await client.get("/api/v1/status", headers={"Host": host})
            assert response.status_code == 200, host
        rebound = await client.get("/api/v1/status", headers={"Host": "evil.example:8025"})
        assert rebound.status_code == 421
        assert rebound.json()["error"]["code"] == "bad_host"
        page = await client.get("/", headers={"Host": "evil.example"})
        assert page.status_code == 421
        # Without a token the dashboard needs no sign-in, and its actions are audited.
        home = await client.get("/")
        assert home.status_code == 200
        assert "mxspool_session" in home.headers["set-cookie"]


async def test_metrics_need_the_token_off_loopback(store: SqliteStore) -> None:
    admin = AdminConfig(listen="192.0.2.1:8025", token="t0ken")
    async with _client(store, admin, loopback=False) as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/healthz")).status_code == 401
        authorized = {"Authorization": "Bearer t0ken"}
        assert (await client.get("/metrics", headers=authorized)).status_code == 200
        assert (await client.get("/healthz", headers=authorized)).status_code == 200
