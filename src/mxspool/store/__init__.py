"""Where mxspool keeps everything; ``create_store`` picks the implementation by URL."""

from __future__ import annotations

from mxspool.store.base import Store, StoreError


def create_store(url: str) -> Store:
    """The store for ``url`` (sqlite:///path or postgresql://...), not yet opened."""
    if url.startswith("sqlite:///"):
        from mxspool.store.sqlite import SqliteStore

        return SqliteStore(url)
    raise StoreError(
        f"store URL {url!r} is not supported by this version; use sqlite:///path/to/spool.db"
    )


__all__ = ["Store", "StoreError", "create_store"]
