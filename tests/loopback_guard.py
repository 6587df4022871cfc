"""Test servers bind loopback only: a bind to a wildcard address in the test process fails.

An audit hook (``sys.addaudithook``) sees every ``socket.bind`` and ``socket.sendto`` of this
process before the call reaches the kernel. A bind to the unspecified address (``0.0.0.0``,
``::``, or ``""``, which means every address), and a datagram sent from a socket that was never
bound (the kernel would bind it to ``0.0.0.0`` and it would take answers from any interface),
raise ``WildcardBind`` instead of happening, so nothing ever listens beyond loopback. Each is
also recorded, and the autouse fixture in conftest fails the test that did it, even where the
code under test catches the exception.

The hook sees the test process's own Python sockets (the in-process servers: the DNS, HTTP and
SMTP peers, the store and intake tests). It is installed once, at configure time; an audit hook
cannot be removed, so it stays for the session. What it cannot see, the processes a test starts
(``mxspool serve`` on uvloop, whose binds are libuv's; haproxy, pebble, smtp-sink, Chromium)
and any socket bound below Python, ``wildcard_sockets`` finds in the kernel's socket table: after
each test's body, while its servers still run, conftest fails the test if this process or any
process it started listens on (TCP), or is bound to (UDP), a wildcard address.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import traceback
from typing import Any

import psutil
import pytest

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})  # refused here


class WildcardBind(RuntimeError):
    """A test tried to bind (or send from) the unspecified address. Not an OSError, so code
    that handles bind failures cannot turn it into a friendly message and carry on."""


VIOLATIONS: list[str] = []
"""What was refused since the last ``take()``, with where it came from."""


def is_wildcard(host: object) -> bool:
    if not isinstance(host, str):
        return False
    if host in WILDCARD_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_unspecified
    except ValueError:
        return False  # a host name: bind resolves it to one address


def _refuse(what: str) -> None:
    where = "".join(traceback.format_stack(limit=8)[:-2])
    VIOLATIONS.append(f"{what}\n{where}")
    raise WildcardBind(f"{what}: test servers listen on 127.0.0.1 (or ::1) only")


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.bind":
        sock, address = args
        if (
            isinstance(sock, socket.socket)
            and sock.family in (socket.AF_INET, socket.AF_INET6)
            and isinstance(address, tuple)
            and address
            and is_wildcard(address[0])
        ):
            _refuse(f"bind to {address!r}")
    elif event == "socket.sendto":
        sock, address = args
        if (
            isinstance(sock, socket.socket)
            and sock.type == socket.SOCK_DGRAM
            and sock.family in (socket.AF_INET, socket.AF_INET6)
            and sock.getsockname()[1] == 0  # never bound: the kernel would bind the wildcard
        ):
            _refuse(f"datagram to {address!r} from an unbound socket")


_installed = False


def install() -> None:
    global _installed
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True


def take() -> list[str]:
    """The violations recorded since the last call, and forget them."""
    taken = VIOLATIONS[:]
    VIOLATIONS.clear()
    return taken


def listening_sockets() -> list[tuple[str, int, str, str, int]]:
    """(process name, pid, "tcp" or "udp", address, port) of every TCP socket listening and
    every UDP socket bound, in this process and in every process it started."""
    me = psutil.Process()
    found = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            name, connections = proc.name(), proc.net_connections("inet")
        except psutil.Error:  # gone meanwhile, or a zombie
            continue
        for conn in connections:
            if not conn.laddr or not conn.laddr.port:
                continue
            if conn.type == socket.SOCK_STREAM and conn.status == psutil.CONN_LISTEN:
                found.append((name, proc.pid, "tcp", conn.laddr.ip, conn.laddr.port))
            elif conn.type == socket.SOCK_DGRAM:
                found.append((name, proc.pid, "udp", conn.laddr.ip, conn.laddr.port))
    return found


def wildcard(sockets: list[tuple[str, int, str, str, int]]) -> list[str]:
    """Those of ``sockets`` (``listening_sockets``) on a wildcard address, described."""
    return [
        f"{name} (pid {pid}) {kind} on {ip}:{port}"
        for name, pid, kind, ip, port in sockets
        if is_wildcard(ip)
    ]


def fail_if_wildcard_sockets() -> None:
    """Fail the current test if this process or one it started is on a wildcard address."""
    found = wildcard(listening_sockets())
    if found:
        pytest.fail(
            "listening on a wildcard address (test servers listen on 127.0.0.1 or ::1 only): "
            + "; ".join(found),
            pytrace=False,
        )


def fail_if_refused() -> None:
    """Fail the current test if anything was refused since the last ``take()``."""
    refused = take()
    if refused:
        pytest.fail("refused a wildcard bind:\n" + "\n".join(refused), pytrace=False)
