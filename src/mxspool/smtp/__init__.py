"""Sans-IO SMTP server protocol core (no sockets, no asyncio, no clocks)."""

from __future__ import annotations

from mxspool.smtp.address import Path
from mxspool.smtp.events import NEED_DATA, PAUSED
from mxspool.smtp.replies import Reply, queued
from mxspool.smtp.server import ServerConfig, ServerConnection, State

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "Path",
    "Reply",
    "ServerConfig",
    "ServerConnection",
    "State",
    "queued",
]
