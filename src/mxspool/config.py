"""Typed, validated configuration (TOML), per docs/interface.md.

Found by ``--config FILE``, else ``$MXSPOOL_CONFIG``, else ``./mxspool.toml`` if present, else
defaults. Unknown keys are an error that names the key; values in human units are parsed here
once, so the rest of the program sees seconds, bytes and events per second.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mxspool.units import parse_duration, parse_rate, parse_size

Seconds = Annotated[float, BeforeValidator(parse_duration)]
Bytes = Annotated[int, BeforeValidator(parse_size)]
PerSecond = Annotated[float, BeforeValidator(parse_rate)]
AddressFamily = Literal["any", "ipv4", "ipv6"]
"""[delivery] address_family: which IP versions delivery may connect over."""


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


def is_ip_address(text: str) -> bool:
    """``text`` is an IPv4 or IPv6 address, written plainly (no brackets)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


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
    tls_reload_interval: Seconds = Field(default=5.0, gt=0)
    """How often the certificate files' mtime/inode are compared: a changed pair is loaded for
    new connections (SIGHUP loads at once). See mxspool.tls.reloader."""
    tls_expiry_warning: Seconds = 14 * 86400.0
    """A WARNING is logged (and `check tls` warns) while the certificate has less left."""
    bare_newlines: Literal["reject", "normalize"] = "normalize"
    """Bare CR or LF in commands or DATA: "normalize" reads it as CRLF (Postfix 3.9's default;
    only <CRLF>.<CRLF> ends DATA either way), "reject" answers 500 5.5.2."""
    spill_threshold: Bytes = parse_size("256KiB")
    """DATA beyond this many bytes goes to a temporary file instead of memory."""
    allow_sender_literals: bool = False
    """Accept MAIL FROM:<user@[192.0.2.1]>; refused by default (550 5.7.1), as a DSN to it would
    go wherever the client wrote."""
    spf_check_private: bool = False
    """Check SPF also for clients on loopback/private addresses (normally skipped: they are
    internal relays, and no SPF record lists them). For tests; leave false in production."""
    authentication: bool = True
    """Check SPF, DKIM and DMARC of every accepted message just after its commit (the 250 does
    not wait) and store the verdict with it, as an Authentication-Results value and the tags
    spf=, dkim=, dmarc= (intake/auth.py). Nothing is refused on it."""
    authserv_id: str = ""
    """The authserv-id of the stored Authentication-Results; empty means ``hostname``."""
    authentication_timeout: Seconds = Field(default=10.0, gt=0, le=120)
    """DNS time one message's check may take (then the lookup records temperror), counted from
    when its check starts; a relayed message waits at most this long (plus a second) after
    its arrival for its verdict, then leaves without one."""
    authentication_workers: int = Field(default=0, ge=0, le=64)
    """Processes verifying DKIM and DMARC (off the intake's CPU); 0 = one less than the CPUs,
    at least one."""
    authentication_max_in_flight: int = Field(default=1024, ge=1, le=100_000)
    """Messages checked at once; beyond this a message's verdict comes a little later from a
    background pass over the store (never a temperror for being busy)."""
    proxy_from: list[str] = []
    """Networks (CIDR) of load balancers that send the PROXY protocol (v1 or v2): a connection
    from them must start with a PROXY header, whose client address then counts everywhere (see
    mxspool.smtp.proxyproto). A PROXY header from any other address is refused."""
    proxy_timeout: Seconds = Field(default=5.0, gt=0, le=60)
    """A connection from proxy_from that has not sent its whole PROXY header this long after
    connecting is closed without a reply (Postfix smtpd_upstream_proxy_timeout)."""
    reverse_lookup: bool = True
    """Look up each client's host name (PTR, forward-confirmed) for the Received: field and
    the mail log, as Postfix's smtpd_peername_lookup; nothing waits for it (intake.ptr)."""
    reverse_lookup_timeout: Seconds = Field(default=5.0, gt=0, le=60)
    """Seconds one client's reverse lookup may take in all; then the client is "unknown"."""

    @field_validator("proxy_from")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"{item!r} is not a network: write an address or a CIDR, e.g. 10.0.0.0/24"
                ) from None
        return value

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
    purge_delivered_after: Seconds = 0.0
    """serve drops the bodies of mail delivered longer ago than this, hourly; 0 = never."""

    @field_validator("purge_delivered_after")
    @classmethod
    def _retention(cls, value: float) -> float:
        if 0 < value < 3600:
            raise ValueError("use at least 1h (e.g. 30d), or 0 to keep delivered mail")
        return value

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
    # Outbound identity (delivery.identity): the address delivery connects from (at most one
    # IPv4 and one IPv6; the one of the destination's family is bound), the families it may
    # use, and a TLS client certificate presented on STARTTLS. Checked when delivery starts.
    source_address: list[str] = []
    address_family: AddressFamily = "any"
    tls_client_cert: str = ""
    tls_client_key: str = ""
    # Exchange Online takes at most 3,600 messages an hour per recipient: drains to domains of
    # the exchange-online profile pace each recipient below it, and `domain release --dry-run`
    # plans with it. Lower only to model a stricter target (tests scale it down).
    per_recipient_hourly_limit: int = Field(default=3600, ge=1)

    @field_validator("retry_schedule")
    @classmethod
    def _non_empty(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("retry_schedule needs at least one interval")
        return value

    @field_validator("source_address")
    @classmethod
    def _one_per_family(cls, value: list[str]) -> list[str]:
        seen: set[int] = set()
        for item in value:
            try:
                address = ipaddress.ip_address(item.strip())
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address (no host names here)") from None
            if address.version in seen:
                raise ValueError(f"at most one IPv{address.version} address, not several")
            seen.add(address.version)
        return [str(ipaddress.ip_address(item.strip())) for item in value]

    @model_validator(mode="after")
    def _identity_consistent(self) -> DeliveryConfig:
        if bool(self.tls_client_cert) != bool(self.tls_client_key):
            raise ValueError("tls_client_cert and tls_client_key go together: set both or neither")
        versions = {ipaddress.ip_address(item).version for item in self.source_address}
        wanted = {"ipv4": 4, "ipv6": 6}.get(self.address_family)
        if wanted is not None and versions and wanted not in versions:
            raise ValueError(
                f'address_family = "{self.address_family}" but source_address has no IPv{wanted} '
                "address: add one, or change address_family"
            )
        return self


class AdminToken(_Section):
    """One ``[[admin.tokens]]`` entry: a named bearer token; the name is the audit actor."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$")
    token: str = Field(default="", max_length=1024)
    token_file: str = ""

    @model_validator(mode="after")
    def _one_source(self) -> AdminToken:
        if bool(self.token) == bool(self.token_file):
            raise ValueError(f"token {self.name!r} needs exactly one of token or token_file")
        return self


class AdminConfig(_Section):
    listen: str = "127.0.0.1:8025"
    token: str = ""
    token_file: str = ""
    tokens: list[AdminToken] = Field(default=[], max_length=100)
    """Named tokens (``[[admin.tokens]]``), beside the single token/token_file."""
    allowed_hosts: list[str] = []
    """Extra Host header values the admin plane answers to ("name" any port, "name:port"),
    e.g. a reverse proxy's public name; the listen address, loopback names and
    [smtp] hostname are always allowed, anything else gets 421 (DNS rebinding defence)."""


class AcmeConfig(_Section):
    """Built-in ACME (RFC 8555) for the SMTP certificate; see mxspool.tls.acme."""

    enabled: bool = False
    directory: str = "https://acme-v02.api.letsencrypt.org/directory"
    """Let's Encrypt production. Staging (for trials, untrusted certificates):
    https://acme-staging-v02.api.letsencrypt.org/directory"""
    email: str = ""
    names: list[str] = []
    """DNS names in the certificate; empty = [smtp] hostname."""
    challenge: Literal["http-01", "dns-01"] = "http-01"
    http_listen: str = "0.0.0.0:80"
    dns_hook: str = ""
    """dns-01: `HOOK set|clear RECORD_NAME VALUE`, exit 0 once the TXT record is served."""
    dns_delay: Seconds = 0.0
    """dns-01: wait this long after the hook's `set` before asking for validation."""
    account_key: str = ""
    """Default: <state directory>/acme/account.key."""
    cert_dir: str = ""
    """Default: <state directory>/acme (fullchain.pem and privkey.pem there)."""
    key_type: Literal["rsa2048", "ec256"] = "rsa2048"
    renew_before: Seconds = 30 * 86400.0
    check_interval: Seconds = Field(default=12 * 3600.0, gt=0)
    retry_after: Seconds = Field(default=600.0, gt=0)
    """First wait after a failed attempt; doubles up to check_interval."""
    ca_file: str = ""
    """CA bundle to verify the ACME server's HTTPS (e.g. pebble's test CA); "" = system."""

    @field_validator("http_listen")
    @classmethod
    def _http_listen(cls, value: str) -> str:
        split_host_port(value)
        return value

    @model_validator(mode="after")
    def _hook_for_dns(self) -> AcmeConfig:
        if self.enabled and self.challenge == "dns-01" and not self.dns_hook:
            raise ValueError('challenge = "dns-01" needs dns_hook (the command that sets TXT)')
        return self


_DNS_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"


class ArcConfig(_Section):
    """ARC sealing of released mail (mxspool.delivery.arc); on when key_file is set."""

    domain: str = ""
    """The sealing domain (d=): what the target tenant lists in Set-ArcConfig."""
    selector: str = "mxspool"
    """The key's selector (s=): published at <selector>._domainkey.<domain>."""
    key_file: str = ""
    """PEM RSA private key ('mxspool arc keygen' makes one); checked at start."""

    @field_validator("domain")
    @classmethod
    def _domain_name(cls, value: str) -> str:
        value = value.strip().rstrip(".").lower()
        if value and not re.fullmatch(rf"{_DNS_LABEL}(\.{_DNS_LABEL})+", value):
            raise ValueError(f"{value!r} is not a domain name (e.g. spool.example.net)")
        return value

    @field_validator("selector")
    @classmethod
    def _selector_name(cls, value: str) -> str:
        if not re.fullmatch(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*", value):
            raise ValueError(f"{value!r} is not a DNS selector (letters, digits, '-', '_')")
        return value

    @model_validator(mode="after")
    def _domain_with_key(self) -> ArcConfig:
        if self.key_file and not self.domain:
            raise ValueError("key_file is set but domain is empty: give the sealing domain (d=)")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.key_file)


class LogConfig(_Section):
    """The mail log (mxspool.maillog): a line per SMTP session and transaction, per delivery
    attempt and per operator action."""

    format: Literal["text", "json"] = "text"
    """"text": Postfix-like ``QUEUEID: event: key=value, ...``; "json": one object a line."""
    file: str = ""
    """Append to this file (reopened when logrotate moves it); "" = stderr (journald)."""
    enabled: bool = True
    """false: no mail log lines at all (the service's own messages still go to stderr)."""


NotifyEvent = Literal[
    "test",
    "backlog_high",
    "parked",
    "release_started",
    "release_finished",
    "disk_low",
    "node_lost",
]
"""The events a ``[[notify]]`` target can subscribe to (mxspool.notify.events)."""


class NotifyTarget(_Section):
    """One ``[[notify]]`` entry: a webhook (``url``) or an email (``to`` through ``relay``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(default="", max_length=64)
    """Shown in logs, metrics and ``notify test``; default: the URL's host or the first "to"."""
    url: str = Field(default="", max_length=2048)
    secret: str = Field(default="", max_length=1024)
    secret_file: str = ""
    to: list[str] = Field(default=[], max_length=20)
    relay: str = ""
    """The operator's mail relay, "host:port" (port 25 when omitted); no SMTP AUTH: the relay
    must accept this node by its address."""
    sender: str = Field(default="", alias="from")
    """The envelope and header From; default mxspool@<[smtp] hostname>."""
    tls: Literal["verify", "require", "opportunistic", "off"] = "opportunistic"
    events: list[NotifyEvent] = []
    """Only these events ("test" always goes); empty = every event."""
    backlog_threshold: int | None = Field(default=None, ge=1)
    """This target's backlog_high level; default [notifications] backlog_threshold."""
    timeout: Seconds = Field(default=10.0, gt=0, le=120)
    """One attempt (connect, send, answer) must finish within this long."""
    max_attempts: int = Field(default=8, ge=1, le=30)
    backoff: Seconds = Field(default=2.0, gt=0, le=3600)
    """The wait before the first retry; doubled after each failure, at most 5 minutes."""
    give_up_after: Seconds = Field(default=3600.0, gt=0)
    """No retry starts later than this after the first attempt."""

    @field_validator("to", mode="before")
    @classmethod
    def _to_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_kind(self) -> NotifyTarget:
        if bool(self.url) == bool(self.to):
            raise ValueError("a [[notify]] entry needs either url (a webhook) or to (an email)")
        if self.url:
            if not re.match(r"^https?://[^/\s]+", self.url):
                raise ValueError(f"url {self.url!r} is not an http:// or https:// URL")
            if bool(self.secret) == bool(self.secret_file):
                raise ValueError("a webhook needs exactly one of secret or secret_file")
            if self.relay:
                raise ValueError("relay is for email targets (to); a webhook has only url")
        else:
            if not self.relay:
                raise ValueError('an email target needs relay = "host:port" (your mail relay)')
            split_host_port(self.relay, 25)
            for address in self.to:
                if address.count("@") != 1 or any(c in address for c in " <>\r\n"):
                    raise ValueError(f"to: {address!r} is not a mail address")
        return self


class NotificationsConfig(_Section):
    """``[notifications]``: what every ``[[notify]]`` target shares (mxspool.notify)."""

    backlog_threshold: int = Field(default=10000, ge=1)
    """backlog_high when a domain's held + pending + delivering reaches this; again only after
    it fell below 90% of it."""
    disk_warning: Bytes = 0
    """disk_low when free space is below this (again only after 10% above it); 0 means twice
    [store] min_free_space."""
    interval: Seconds = Field(default=5.0, ge=0.2, le=300)
    """How often serve looks at the store's counters for events."""
    queue_size: int = Field(default=1000, ge=1, le=100000)
    """Events waiting per target; when full the oldest is dropped (logged, counted)."""
    node_timeout: Seconds = 0.0
    """PostgreSQL clusters: node_lost when a node is not seen for this long; 0 means three
    times [delivery] lease."""


class Config(_Section):
    smtp: SmtpConfig = SmtpConfig()
    store: StoreConfig = StoreConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    admin: AdminConfig = AdminConfig()
    acme: AcmeConfig = AcmeConfig()
    arc: ArcConfig = ArcConfig()
    log: LogConfig = LogConfig()
    notify: list[NotifyTarget] = Field(default=[], max_length=50)
    notifications: NotificationsConfig = NotificationsConfig()
    source: str = "defaults"
    """Where this configuration came from (a path, or "defaults"); not a TOML key."""

    @model_validator(mode="after")
    def _one_certificate_source(self) -> Config:
        if self.acme.enabled and (self.smtp.tls_cert or self.smtp.tls_key):
            raise ValueError(
                "[acme] enabled and [smtp] tls_cert/tls_key both name the certificate: ACME "
                "keeps its own under [acme] cert_dir; remove tls_cert and tls_key, or disable ACME"
            )
        return self


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
