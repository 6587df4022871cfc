"""Where mxspool keeps everything; ``create_store`` picks the implementation by URL."""

from __future__ import annotations

from mxspool.store.base import Store, StoreError


def create_store(url: str) -> Store:
    """The store for ``url`` (sqlite:///path or postgresql://...), not yet opened."""
    if url.startswith("sqlite:///"):
        from mxspool.store.sqlite import SqliteStore

        return SqliteStore(url)
    if url.startswith(("postgresql://", "postgres://")):
        from mxspool.store.postgres import PostgresStore

        return PostgresStore(url)
    raise StoreError(
        f"store URL {url!r} is not supported; use sqlite:///path/to/spool.db "
        "or postgresql://user@host/db"
    )


__all__ = ["Store", "StoreError", "create_store"]
