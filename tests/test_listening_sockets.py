"""serve binds every SMTP listener before it serves any (service._listening_sockets)."""

from __future__ import annotations

import socket

import pytest

from mxspool.service import _listening_sockets
from mxspool.store import StoreError
from tests.conftest import free_ports


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
