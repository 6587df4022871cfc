"""Where mxspool keeps everything; ``create_store`` picks the implementation by URL.

The PostgreSQL store is an extra (``pip install 'mxspool[postgres]'``): its module, the only one
that imports psycopg, is imported here only for a postgresql:// URL, so a SQLite node never
needs psycopg, and a PostgreSQL URL without it fails with a message naming the extra.
"""

from __future__ import annotations

from mxspool.store.base import Store, StoreError

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
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from mxspool.store.postgres import PostgresStore
        except ImportError as exc:
            if not _from_postgres_extra(exc):
                raise
            raise MissingDependency(
                f"the store URL is postgresql:// but its driver cannot be imported ({exc}); "
                "install the PostgreSQL support with: pip install 'mxspool[postgres]' "
                "(or use a sqlite:/// store URL)"
            ) from None
        return PostgresStore(url)
    raise StoreError(
        f"store URL {url!r} is not supported; use sqlite:///path/to/spool.db "
        "or postgresql://user@host/db"
    )


__all__ = ["MissingDependency", "Store", "StoreError", "create_store"]
