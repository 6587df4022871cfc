"""The admin plane: HTTP API (/api/v1), dashboard (/), /healthz and Prometheus /metrics.

``admin_component`` runs it on the node's event loop (append it to
``service.extra_components``); every action goes through ``mxspool.operations``, exactly as the
CLI's do.
"""

from __future__ import annotations

from mxspool.admin.app import create_app
from mxspool.admin.auth import AdminConfigError
from mxspool.admin.server import admin_component, check_config

__all__ = ["AdminConfigError", "admin_component", "check_config", "create_app"]
