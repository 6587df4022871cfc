"""mxspool: an SMTP spooler for moving email domains between Microsoft 365 tenants."""

from __future__ import annotations

__version__ = "0.1.0"
