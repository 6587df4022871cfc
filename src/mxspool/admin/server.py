"""The admin plane as a component of the node: uvicorn on the node's own event loop.

uvicorn normally installs SIGINT/SIGTERM handlers; here the node owns signals (service.run),
so ``_Server`` captures none, and the component stops when its task is cancelled. The socket
is bound here, before uvicorn starts, so a busy port is a clear error instead of uvicorn's
``sys.exit``; and it listens at once, in the component's first step (no await before it).
``service.run`` lets every component take that step before it opens the SMTP listeners, so the
admin port queues connections before any SMTP client can be greeted: a health check
(``/readyz``) or an orchestrator that saw the greeting is answered, not refused, once uvicorn
serves the queued connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn

from mxspool.admin.app import create_app
from mxspool.admin.auth import (
    AdminConfigError,
    Auth,
    admin_address,
    host_policy,
    load_tokens,
)
from mxspool.admin.context import AdminContext
from mxspool.admin.history import History, run_sampler
from mxspool.config import Config, is_loopback
from mxspool.store.base import Store

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def check_config(config: Config) -> None:
    """Raise AdminConfigError when the [admin] section is unsafe or unusable."""
    admin_address(config.admin, load_tokens(config.admin))
    host_policy(config)


BACKLOG = 128
"""Connections the kernel queues on the admin port until uvicorn accepts them."""


def _bind(host: str, port: int, listen: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    address = "127.0.0.1" if host == "localhost" else host
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise AdminConfigError(
            f"cannot listen on {listen} for the admin API: {exc.strerror or exc}; is another "
            "server using that port? Change [admin] listen in the configuration"
        ) from exc
    return sock


async def admin_component(config: Config, store: Store, domains: object = None) -> None:
    """``service.extra_components`` entry: serve the admin HTTP plane until cancelled."""
    tokens = load_tokens(config.admin)
    host, port = admin_address(config.admin, tokens)
    host_policy(config)
    sock = _bind(host, port, config.admin.listen)
    history = History()
    context = AdminContext(config, store, Auth(tokens, is_loopback(host)), history)
    server = _Server(
        uvicorn.Config(
            create_app(context),
            http="h11",
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=2,
        )
    )
    sampler = asyncio.create_task(run_sampler(store, history), name="admin-sampler")
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="admin-http")
    log.info("admin HTTP listening on %s", config.admin.listen)
    try:
        await asyncio.wait({serving})
        serving.result()
        raise RuntimeError("the admin HTTP server stopped by itself; see the log above")
    except asyncio.CancelledError:
        server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(serving, 5)
        raise
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        sock.close()
