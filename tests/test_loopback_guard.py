"""The test process cannot bind a wildcard address, the sockets of the processes a test starts
are seen (tests/loopback_guard.py), and loopback is not affected.

The refusals are shown without attempting a wildcard bind or an unbound send at all: each test
raises the audit event that ``socket.bind`` and ``socket.sendto`` raise before they reach the
kernel (``sys.audit``, as CPython does for them), with a real socket, so the installed hook sees
exactly what the call would show it, and a guard that failed could still not bind anything."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests import loopback_guard


@pytest.mark.parametrize(
    ("family", "host"),
    [
        (socket.AF_INET, "0.0.0.0"),  # refused, never bound
        (socket.AF_INET, ""),
        (socket.AF_INET6, "::"),
        (socket.AF_INET6, "0:0::0"),
    ],
)
def test_a_wildcard_bind_is_refused_before_it_happens(family: int, host: str) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        with pytest.raises(loopback_guard.WildcardBind, match=r"127\.0\.0\.1"):
            sys.audit("socket.bind", sock, (host, 0))  # what sock.bind((host, 0)) raises first
        assert sock.getsockname()[1] == 0  # nothing was bound
    refused = loopback_guard.take()  # taken here, so the autouse check passes this test
    assert len(refused) == 1 and "bind to" in refused[0]


def test_a_datagram_from_an_unbound_socket_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with pytest.raises(loopback_guard.WildcardBind):
            sys.audit("socket.sendto", sock, ("127.0.0.1", 9))  # what sendto raises first
        assert sock.getsockname()[1] == 0  # the kernel did not bind it
        # The control: bound to loopback first, the same send goes out.
        sock.bind(("127.0.0.1", 0))
        assert sock.sendto(b"x", ("127.0.0.1", 9)) == 1
    assert len(loopback_guard.take()) == 1


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_loopback_binds_and_listens(family: int, host: str) -> None:
    with socket.create_server((host, 0), family=family) as server:
        port = server.getsockname()[1]
        with socket.create_connection((host, port), timeout=5):
            pass
    assert loopback_guard.take() == []


def test_a_caught_refusal_still_fails_the_test() -> None:
    """Code that swallows the error does not hide it: the check after each test fails it."""
    with socket.socket() as sock:
        try:
            sys.audit("socket.bind", sock, ("", 0))  # as sock.bind(("", 0)) would
        except Exception:  # what careless code under test might do
            pass
    with pytest.raises(pytest.fail.Exception, match="refused a wildcard bind"):
        loopback_guard.fail_if_refused()
    loopback_guard.fail_if_refused()  # the control: taken, nothing is left to fail on


LISTEN_ON_LOOPBACK = """
import socket, sys
tcp = socket.create_server(("127.0.0.1", 0))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", 0))
print(tcp.getsockname()[1], udp.getsockname()[1], flush=True)
sys.stdin.read()
"""


def test_the_sockets_of_a_started_process_are_seen() -> None:
    # A child process (no audit hook there) listening on loopback: the socket table shows its
    # sockets, and none is a wildcard one.
    child = subprocess.Popen(
        [sys.executable, "-c", LISTEN_ON_LOOPBACK],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        tcp, udp = (int(port) for port in child.stdout.readline().split())
        mine = [s for s in loopback_guard.listening_sockets() if s[1] == child.pid]
        assert sorted(mine) == sorted(
            [
                (mine[0][0], child.pid, "tcp", "127.0.0.1", tcp),
                (mine[0][0], child.pid, "udp", "127.0.0.1", udp),
            ]
        )
        assert loopback_guard.wildcard(mine) == []
    finally:
        child.communicate("", timeout=10)
    # What would be reported, without binding a wildcard address to show it.
    sockets = [
        ("haproxy", 7, "tcp", "0.0.0.0", 25),
        ("pebble", 8, "tcp", "::", 14000),
        ("python3", 9, "udp", "0.0.0.0", 5353),
        ("python3", 9, "tcp", "::1", 2525),
    ]
    assert loopback_guard.wildcard(sockets) == [
        "haproxy (pid 7) tcp on 0.0.0.0:25",
        "pebble (pid 8) tcp on :::14000",
        "python3 (pid 9) udp on 0.0.0.0:5353",
    ]
