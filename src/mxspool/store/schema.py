"""Where each SQL store's migrations are: ``migrations/<backend>/NNNN_name.sql``."""

from __future__ import annotations

from importlib import resources


def migration_scripts(backend: str) -> list[tuple[int, str]]:
    """(version, SQL script) of every migration of ``backend`` ("sqlite", "postgres"), in order."""
    folder = resources.files("mxspool.store") / "migrations" / backend
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text(encoding="utf-8")))
    return sorted(found)
