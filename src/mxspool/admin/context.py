"""What every admin request handler needs: the configuration, the store, auth and history."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from starlette.requests import Request

from mxspool.admin.auth import Auth
from mxspool.admin.history import History
from mxspool.config import Config
from mxspool.store.base import Store


@dataclass(frozen=True, slots=True)
class AdminContext:
    config: Config
    store: Store
    auth: Auth
    history: History


def context_of(request: Request) -> AdminContext:
    return cast(AdminContext, request.app.state.admin)
