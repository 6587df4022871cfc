"""Fixtures for the store contract tests: each backend, a fresh store per test.

PostgreSQL comes from ``MXSPOOL_TEST_PG`` (CI sets it), else the machine's server at
postgresql://postgres@127.0.0.1:5432/test. When the variable is set and the server does not
answer, the tests fail loudly rather than skip: CI must never pass without running them.
Each test gets its own schema (selected through the URL's search_path option), dropped after.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from mxspool.store import create_store, sqlite
from mxspool.store.base import Store

PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"

StoreFactory = Callable[[], Awaitable[Store]]


def with_search_path(url: str, schema: str) -> str:
    """``url`` with ``options=-csearch_path=<schema>`` added to its query string.

    The schema's name is also the connections' application_name, so a test can find (and
    terminate) its own server connections without touching anyone else's.
    """
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}&application_name={schema}"


@pytest.fixture(scope="session")
def pg_server() -> str:
    url = os.environ.get("MXSPOOL_TEST_PG") or PG_DEFAULT
    try:
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.Error as exc:
        if os.environ.get("MXSPOOL_TEST_PG"):
            pytest.fail(
                f"MXSPOOL_TEST_PG={url} is set but PostgreSQL does not answer: {exc}",
                pytrace=False,
            )
        pytest.skip(f"no PostgreSQL at {url} and MXSPOOL_TEST_PG is not set: {exc}")
    return url


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A store URL whose search_path is a new, empty schema of its own."""
    schema = f"mxspool_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    yield with_search_path(pg_server, schema)
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


# SQLite runs twice where the C commit thread is built: with it (accepts committed in C) and
# without (everything through the Python writer), so both keep the same contract.
SQLITE_WRITERS = ["sqlite", "sqlite-python-writer"] if sqlite.ACCELERATED else ["sqlite"]


@pytest.fixture(params=[*SQLITE_WRITERS, "postgres"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "sqlite-python-writer":
        monkeypatch.setattr(sqlite, "ACCELERATED", False)
    return str(request.param)


@pytest.fixture
def store_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'spool.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def open_store(store_url: str) -> AsyncIterator[StoreFactory]:
    """Opens another store instance on the same database (like another node would)."""
    opened: list[Store] = []

    async def make() -> Store:
        store = create_store(store_url)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_store: StoreFactory) -> Store:
    return await open_store()
