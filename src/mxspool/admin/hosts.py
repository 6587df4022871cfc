"""Which Host header values the admin plane answers to: the defence against DNS rebinding.

A web page on evil.example can point evil.example's DNS at 127.0.0.1 after loading, and its
scripts then reach the admin listener as if it were evil.example, reading the answers. The
browser still sends ``Host: evil.example``, so every request whose Host is not one of the admin
plane's own names is refused with 421 Misdirected Request before routing, authentication or
any handler runs: the API, the dashboard, /metrics and /healthz alike, token or no token.

Allowed, each with the listen port or without a port (what a local reverse proxy may send):

* the listen address's host, and any loopback name (localhost, 127.0.0.0/8, [::1]);
* ``[smtp] hostname``;
* for a wildcard listener (0.0.0.0 or [::]) any IP literal: a browser sends an IP literal as
  Host only when the page's own address is that IP, which is not rebinding;
* ``[admin] allowed_hosts``: "name" with any port, "name:port" with that port only.

A request without a Host header is allowed: browsers always send one, so it is not a browser.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from mxspool.config import Config, is_loopback, split_host_port

NO_PORT = 0
"""The port of a Host header without one (a real port is never 0)."""


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _normal(name: str) -> str:
    """Case, a trailing dot and IPv6 spellings do not matter."""
    ip = _ip(name)
    return str(ip) if ip is not None else name.lower().rstrip(".")


_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\[\]:/@\s]+)(?::([0-9]{1,5}))?")


def parse_host(value: str) -> tuple[str, int]:
    """Name and port of a Host header (port NO_PORT when absent); ValueError if malformed."""
    match = _HOST.fullmatch(value.strip())
    if match is None:
        raise ValueError("expected host or host:port")
    name, port_text = match.group(1), match.group(2)
    port = int(port_text) if port_text else NO_PORT
    if port_text and not 0 < port < 65536:
        raise ValueError(f"port {port_text} is out of range")
    if name.startswith("["):
        name = name[1:-1]
        if _ip(name) is None:
            raise ValueError(f"{name!r} is not an IPv6 address")
    return _normal(name), port


@dataclass(frozen=True, slots=True)
class HostPolicy:
    port: int
    """The listen port: own names may carry it (or no port)."""
    names: frozenset[str]
    any_port: frozenset[str]
    exact: frozenset[tuple[str, int]]
    any_ip: bool
    listen: str

    @classmethod
    def of(cls, config: Config) -> HostPolicy:
        """The policy for a configuration; ValueError names a malformed entry."""
        host, port = split_host_port(config.admin.listen)
        names = {_normal(host), _normal(config.smtp.hostname), "localhost"}
        any_port: set[str] = set()
        exact: set[tuple[str, int]] = set()
        for entry in config.admin.allowed_hosts:
            try:
                name, entry_port = parse_host(entry)
            except ValueError as exc:
                raise ValueError(
                    f"[admin] allowed_hosts entry {entry!r} is not a host name or host:port "
                    f"({exc}); write it as the browser's address bar shows it, e.g. "
                    '"admin.example.net" or "admin.example.net:8443"'
                ) from None
            if entry_port == NO_PORT:
                any_port.add(name)
            else:
                exact.add((name, entry_port))
        ip = _ip(host)
        return cls(
            port=port,
            names=frozenset(names),
            any_port=frozenset(any_port),
            exact=frozenset(exact),
            any_ip=ip is not None and ip.is_unspecified,
            listen=config.admin.listen,
        )

    def allows(self, header: str | None) -> bool:
        if header is None:
            return True
        try:
            name, port = parse_host(header)
        except ValueError:
            return False
        if name in self.any_port or (name, port) in self.exact:
            return True
        if port not in (self.port, NO_PORT):
            return False
        return name in self.names or is_loopback(name) or (self.any_ip and _ip(name) is not None)

    def refusal(self, header: str) -> str:
        shown = header if len(header) <= 100 else header[:100] + "..."
        return (
            f"Host {shown!r} is not a name of this admin listener, so the request is refused "
            "(a defence against DNS rebinding); use its address "
            f"({self.listen}, localhost or [smtp] hostname) or add the name to "
            "[admin] allowed_hosts"
        )
