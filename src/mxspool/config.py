"""Typed, validated configuration (TOML), per docs/interface.md.

Found by ``--config FILE``, else ``$MXSPOOL_CONFIG``, else ``./mxspool.toml`` if present, else
defaults. Unknown keys are an error that names the key; values in human units are parsed here
once, so the rest of the program sees seconds, bytes and events per second.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from mxspool.units import parse_duration, parse_rate, parse_size

Seconds = Annotated[float, BeforeValidator(parse_duration)]
Bytes = Annotated[int, BeforeValidator(parse_size)]
PerSecond = Annotated[float, BeforeValidator(parse_rate)]


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


def split_host_port(value: str, default_port: int | None = None) -> tuple[str, int]:
    """Split "host:port", "[v6]:port" or (with a default port) "host"."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep:
            raise ValueError(f"unclosed [ in address {value!r}")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    elif value.count(":") > 1:
        raise ValueError(f"IPv6 addresses need brackets: [{value}]:port")
    else:
        host, port_text = value, ""
    if not port_text:
        if default_port is None:
            raise ValueError(f"address {value!r} has no port (use host:port)")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {value!r}")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SmtpConfig(_Section):
    listen: list[str] = ["127.0.0.1:2525"]
    hostname: str = Field(default_factory=socket.getfqdn)
    max_message_size: Bytes = parse_size("150MiB")
    max_recipients: int = Field(default=1000, ge=1)
    max_connections: int = Field(default=1000, ge=1)
    max_connections_per_ip: int = Field(default=50, ge=1)
    idle_timeout: Seconds = 300.0
    """No byte from the client (or no reply read by it) for this long: 421 4.4.2 and close."""
    command_timeout: Seconds = Field(default=300.0, gt=0)
    """Deadline for one whole command line, from when the server is ready to read it (Postfix
    smtpd_timeout): a client trickling bytes cannot hold a session open."""
    min_data_rate: Bytes = 500
    """Bytes per second a client must send during DATA, over each data_rate_window (Postfix
    smtpd_min_data_rate); 0 = no minimum."""
    data_rate_window: Seconds = Field(default=30.0, gt=0)
    """The period min_data_rate is measured over; only a complete window counts."""
    ipv6_prefix_length: int = Field(default=64, ge=48, le=128)
    """max_connections_per_ip counts IPv6 clients per network of this prefix length."""
    soft_error_limit: int = Field(default=10, ge=1)
    """After this many 4xx/5xx replies in a session, each reply waits error_delay (Postfix)."""
    hard_error_limit: int = Field(default=20, ge=0)
    """At this many 4xx/5xx replies, 421 4.7.0 and close (Postfix); 0 = no limit."""
    error_delay: Seconds = 1.0
    """The delay of each reply past soft_error_limit (Postfix smtpd_error_sleep_time)."""
    tls_cert: str = ""
    tls_key: str = ""
    bare_newlines: Literal["reject", "normalize"] = "reject"
    spill_threshold: Bytes = parse_size("256KiB")
    """DATA beyond this many bytes goes to a temporary file instead of memory."""
    allow_sender_literals: bool = False
    """Accept MAIL FROM:<user@[192.0.2.1]>; refused by default (550 5.7.1), as a DSN to it would
    go wherever the client wrote."""
    spf_check_private: bool = False
    """Check SPF also for clients on loopback/private addresses (normally skipped: they are
    internal relays, and no SPF record lists them). For tests; leave false in production."""

    @field_validator("listen")
    @classmethod
    def _listen_addresses(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one listen address is needed")
        for item in value:
            split_host_port(item)
        return value

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert and self.tls_key)


class StoreConfig(_Section):
    url: str = "sqlite:///mxspool-data/spool.db"
    min_free_space: Bytes = parse_size("1GiB")

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("use sqlite:///path/to/spool.db or postgresql://user@host/db")
        return value


class DeliveryConfig(_Section):
    concurrency: int = Field(default=10, ge=1)
    rate: PerSecond = 0.0
    retry_schedule: list[Seconds] = [60.0, 300.0, 900.0, 1800.0, 3600.0]
    max_age: Seconds = 14 * 86400.0
    connect_timeout: Seconds = 30.0
    # Consecutive connection failures (refused, timeout, DNS, greeting not 220, TLS required
    # and failed) after which a destination is dead: its whole queue is deferred at once and
    # one connection probes it per retry_schedule step (Postfix's dead destination).
    dead_after_failures: int = Field(default=3, ge=1)
    resolver: str = ""
    ca_file: str = ""
    # Claims on due mail and cluster connection slots last this long unless renewed (every
    # third of it while the worker lives): a dead node's mail and slots come back after it.
    # Shorter means faster takeover but more renewals; tests shorten it.
    lease: Seconds = Field(default=30.0, gt=0)

    @field_validator("retry_schedule")
    @classmethod
    def _non_empty(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("retry_schedule needs at least one interval")
        return value


class AdminConfig(_Section):
    listen: str = "127.0.0.1:8025"
    token: str = ""
    token_file: str = ""
    allowed_hosts: list[str] = []
    """Extra Host header values the admin plane answers to ("name" any port, "name:port"),
    e.g. a reverse proxy's public name; the listen address, loopback names and
    [smtp] hostname are always allowed, anything else gets 421 (DNS rebinding defence)."""


class Config(_Section):
    smtp: SmtpConfig = SmtpConfig()
    store: StoreConfig = StoreConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    admin: AdminConfig = AdminConfig()
    source: str = "defaults"
    """Where this configuration came from (a path, or "defaults"); not a TOML key."""


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"configuration error in {source}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"  unknown key {where!r}; remove it or check its spelling")
        else:
            lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


def config_path(explicit: str | None) -> Path | None:
    """The file to read, following docs/interface.md's search order."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("MXSPOOL_CONFIG")
    if env:
        return Path(env)
    local = Path("mxspool.toml")
    return local if local.exists() else None


def load_config(explicit: str | None = None) -> Config:
    """Read and validate the configuration; raise ConfigError with a readable message."""
    path = config_path(explicit)
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
        if "source" in data:
            raise ConfigError(f"configuration error in {path}:\n  unknown key 'source'")
    try:
        return Config.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
