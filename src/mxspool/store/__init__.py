"""Where mxspool keeps everything; ``create_store`` picks the implementation by URL.

The PostgreSQL store is an extra (``pip install 'mxspool[postgres]'``): its module, the only one
that imports psycopg, is imported here only for a postgresql:// URL, so a SQLite node never
needs psycopg, and a PostgreSQL URL without it fails with a message naming the extra.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from mxspool.store.base import Store, StoreError

if TYPE_CHECKING:
    from mxspool.store.postgres import ServerHealth

POSTGRES_MODULES = frozenset({"psycopg", "psycopg_pool", "psycopg_binary", "psycopg_c"})
"""What the ``postgres`` extra installs; only :mod:`mxspool.store.postgres` imports them."""


class MissingDependency(StoreError):
    """The configured store needs a package that is not installed; the message names the extra."""


def _from_postgres_extra(exc: ImportError) -> bool:
    """True when ``exc`` is about psycopg (missing, or installed without its C/binary layer)."""
    if exc.name is not None:
        return exc.name.partition(".")[0] in POSTGRES_MODULES
    return "psycopg" in str(exc)


def create_store(url: str) -> Store:
    """The store for ``url`` (sqlite:///path or postgresql://...), not yet opened."""
    if url.startswith("sqlite:///"):
        from mxspool.store.sqlite import SqliteStore

        return SqliteStore(url)
    if is_postgres(url):
        with _postgres_extra():
            from mxspool.store.postgres import PostgresStore
        return PostgresStore(url)
    raise StoreError(
        f"store URL {url!r} is not supported; use sqlite:///path/to/spool.db "
        "or postgresql://user@host/db"
    )


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def postgres_health(url: str, node: str = "") -> ServerHealth:
    """What ``mxspool doctor`` judges about the PostgreSQL server behind ``url``, and who holds
    the node name ``node`` (blocking)."""
    with _postgres_extra():
        from mxspool.store.postgres import server_health
    return server_health(url, node)


@contextlib.contextmanager
def _postgres_extra() -> Iterator[None]:
    """Imports of the PostgreSQL store: a missing psycopg becomes a message naming the extra."""
    try:
        yield
    except ImportError as exc:
        if not _from_postgres_extra(exc):
            raise
        raise MissingDependency(
            f"the store URL is postgresql:// but its driver cannot be imported ({exc}); "
            "install the PostgreSQL support with: pip install 'mxspool[postgres]' "
            "(or use a sqlite:/// store URL)"
        ) from None


__all__ = [
    "MissingDependency",
    "Store",
    "StoreError",
    "create_store",
    "is_postgres",
    "postgres_health",
]
