"""serve binds every SMTP listener before it serves any (service._listening_sockets), and the
admin plane's before those (admin.server)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mxspool.admin.server import admin_component
from mxspool.config import AdminConfig, Config, SmtpConfig
from mxspool.service import _listening_sockets
from mxspool.store import StoreError
from mxspool.store.sqlite import SqliteStore
from tests.conftest import MXSPOOL, Spooler, free_ports


def _connects(family: socket.AddressFamily, host: str, port: int) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(5)
        return probe.connect_ex((host, port)) == 0


def test_every_listener_accepts_connections_before_any_is_served() -> None:
    v4, v6 = free_ports(2)
    sockets = _listening_sockets([f"127.0.0.1:{v4}", f"[::1]:{v6}"])
    try:
        # No event loop runs: the kernel completes the handshake on both, which is what a
        # client that has already been greeted on the first address relies on.
        assert _connects(socket.AF_INET, "127.0.0.1", v4)
        assert _connects(socket.AF_INET6, "::1", v6)
        assert sockets[1].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for sock in sockets:
            sock.close()
    # Control: once closed, the same addresses refuse.
    assert not _connects(socket.AF_INET, "127.0.0.1", v4)
    assert not _connects(socket.AF_INET6, "::1", v6)


def test_a_taken_address_names_itself_and_leaves_nothing_open() -> None:
    first, taken = free_ports(2)
    with socket.create_server(("127.0.0.1", taken)):
        with pytest.raises(StoreError, match=rf"cannot listen on 127\.0\.0\.1:{taken}"):
            _listening_sockets([f"127.0.0.1:{first}", f"127.0.0.1:{taken}"])
        assert not _connects(socket.AF_INET, "127.0.0.1", first)  # the first was closed
        assert _connects(socket.AF_INET, "127.0.0.1", taken)  # control: the holder still listens


async def test_the_admin_port_listens_after_the_components_first_step(tmp_path: Path) -> None:
    """service.run gives every component one step (``asyncio.sleep(0)``) before it opens the
    SMTP listeners; the admin plane's socket listens from that step, before uvicorn runs, so
    a client greeted on SMTP can already reach /readyz (the kernel queues the connection)."""
    (port,) = free_ports(1)
    config = Config(
        admin=AdminConfig(listen=f"127.0.0.1:{port}"), smtp=SmtpConfig(hostname="mx.test")
    )
    store = SqliteStore(f"sqlite:///{tmp_path / 'spool.db'}")
    await store.open()
    assert not _connects(socket.AF_INET, "127.0.0.1", port)  # control: nothing there yet
    component = asyncio.create_task(admin_component(config, store))
    try:
        await asyncio.sleep(0)  # what service.run does before start_listeners
        assert _connects(socket.AF_INET, "127.0.0.1", port)
    finally:
        component.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await component
        await store.close()
    assert not _connects(socket.AF_INET, "127.0.0.1", port)  # and the component closes it


def test_a_component_that_fails_stops_serve_with_status_1(spooler_factory: Any) -> None:
    """A component that fails stops the node with exit status 1, so systemd's
    Restart=on-failure starts it again; one that fails at its first step (here the admin
    plane, its port taken) stops it before SMTP opens."""
    node: Spooler = spooler_factory()
    with socket.create_server(("127.0.0.1", node.admin_port)):
        proc = subprocess.run(
            [MXSPOOL, "--config", str(node.config), "serve"],
            capture_output=True,
            timeout=60,
            check=False,
        )
    log = proc.stderr.decode()
    assert proc.returncode == 1, log
    assert "the node stopped because a component failed: cannot listen on" in log
    assert "SMTP listening" not in log and "mxspool ready" not in log
    # The control: with its admin port free the same node serves.
    node.start()
    assert _connects(socket.AF_INET, "127.0.0.1", node.port)
