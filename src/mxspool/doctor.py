"""``mxspool doctor``: is this machine ready to run the spooler? Each check says what to fix.

An operator sets a spooler up once per migration, on a fresh VM, in a hurry; what goes wrong is
rarely mxspool and often the machine: a key file anyone can read, a port another MTA holds, a
certificate that does not match its key or expires mid-migration, a resolver that does not
answer, a small disk, a PostgreSQL server that could lose acknowledged mail or never vacuums,
a clock nobody synchronises (certificates, retry times and the report's timestamps all trust
it). ``doctor`` checks those, without changing anything, and prints one line per check with
the fix. Exit 0 when nothing failed (warnings allowed), 1 otherwise.

The clock cannot be compared with anything outside (a spooler may have no internet access to
NTP servers beyond its own), so it asks the kernel whether it considers the clock synchronised
(``timedatectl``, else ``adjtimex(2)``); it never fails, at worst it warns or says unknown.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import dns.exception
import dns.resolver

from mxspool import nameservers
from mxspool.config import Config, split_host_port
from mxspool.store import StoreError, is_postgres, postgres_health
from mxspool.store.base import SYNCHRONOUS_COMMIT_OFF
from mxspool.store.serverlock import SpoolBusy, SpoolLock, lock_path
from mxspool.store.sqlite import sqlite_path
from mxspool.tls import certinfo
from mxspool.tls.files import served_paths, state_dir
from mxspool.units import format_duration

if TYPE_CHECKING:
    from mxspool.store.postgres import ServerHealth

DNS_TIMEOUT = 3.0
"""Seconds the resolver gets to answer one query."""
CLOCK_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    status: str
    """ok, warn, fail or unknown; only fail makes doctor exit 1."""
    detail: str
    fix: str = ""


def _ok(check: str, detail: str) -> Finding:
    return Finding(check, "ok", detail)


# -- permissions -----------------------------------------------------------------------------


def _secret_files(config: Config) -> Iterator[tuple[str, Path, bool]]:
    """(what, path, is a token) of every secret the configuration names."""
    if config.smtp.tls_key:
        yield "[smtp] tls_key", Path(config.smtp.tls_key), False
    if config.delivery.tls_client_key:
        yield "[delivery] tls_client_key", Path(config.delivery.tls_client_key), False
    if config.arc.key_file:
        yield "[arc] key_file", Path(config.arc.key_file), False
    if config.admin.token_file:
        yield "[admin] token_file", Path(config.admin.token_file), True
    for token in config.admin.tokens:
        if token.token_file:
            yield f"[[admin.tokens]] {token.name}", Path(token.token_file), True


def check_permissions(config: Config) -> Iterator[Finding]:
    directory = state_dir(config)
    if not directory.exists():
        parent = next((p for p in directory.parents if p.exists()), Path("/"))
        if os.access(parent, os.W_OK | os.X_OK):
            yield _ok("state dir", f"{directory} does not exist yet; serve will create it")
        else:
            yield Finding(
                "state dir",
                "fail",
                f"{directory} does not exist and {parent} is not writable",
                f"create it for the service user: install -d -m 0750 {directory}",
            )
    elif os.access(directory, os.W_OK | os.X_OK):
        yield _ok("state dir", f"{directory} is writable")
    else:
        yield Finding(
            "state dir",
            "fail",
            f"{directory} is not writable by this user",
            f"chown it to the service user, or run doctor as that user: chmod u+rwx {directory}",
        )
    for what, path, is_token in _secret_files(config):
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError as exc:
            yield Finding(
                what, "fail", f"{path}: {exc.strerror or exc}", "fix the path in the configuration"
            )
            continue
        if is_token and mode & 0o077:
            yield Finding(
                what,
                "fail",
                f"{path} has mode {mode:04o}; a token file must be 0600",
                f"chmod 600 {path}",
            )
        elif mode & 0o007:
            yield Finding(
                what,
                "fail",
                f"{path} has mode {mode:04o}: every user of this machine can read it",
                f"chmod 600 {path}",
            )
        else:
            yield _ok(what, f"{path} has mode {mode:04o}")


# -- ports -----------------------------------------------------------------------------------


def _ours(config: Config) -> str | None:
    """Who holds the spool's serve lock (our server), or None."""
    if not config.store.url.startswith("sqlite:///"):
        return None
    spool = sqlite_path(config.store.url)
    if not lock_path(spool).exists():  # no server ever ran here (and doctor creates nothing)
        return None
    try:
        with SpoolLock(spool, "mxspool doctor"):
            return None
    except SpoolBusy as exc:
        return str(exc).partition("in use by ")[2].partition(";")[0] or "mxspool serve"
    except OSError:
        return None


def _listen_addresses(config: Config) -> Iterator[tuple[str, str]]:
    for address in config.smtp.listen:
        yield "smtp", address
    yield "admin", config.admin.listen
    if config.acme.enabled and config.acme.challenge == "http-01":
        yield "acme", config.acme.http_listen


def check_ports(config: Config) -> Iterator[Finding]:
    ours = _ours(config)
    for what, address in _listen_addresses(config):
        name = f"port {what} {address}"
        host, port = split_host_port(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and ours:
                yield _ok(name, f"in use by our server ({ours})")
            elif exc.errno == errno.EADDRINUSE:
                yield Finding(
                    name,
                    "fail",
                    "another program listens there",
                    f"find it with 'ss -ltnp sport = :{port}' and stop it (often a local "
                    "Postfix or Exim on port 25), or change the listen address",
                )
            elif exc.errno == errno.EACCES:
                yield Finding(
                    name,
                    "fail",
                    f"this user may not bind port {port} (below 1024)",
                    "run the service with CAP_NET_BIND_SERVICE (the systemd unit's "
                    "AmbientCapabilities does), or listen on a port above 1023",
                )
            else:
                yield Finding(
                    name,
                    "fail",
                    f"cannot bind: {exc.strerror or exc}",
                    "use an address of this machine in the listen setting",
                )
        else:
            yield _ok(name, "free to bind")
        finally:
            sock.close()


# -- certificate -----------------------------------------------------------------------------


def check_certificate(config: Config) -> Iterator[Finding]:
    paths = served_paths(config)
    if paths is None:
        yield Finding(
            "certificate",
            "warn",
            "no STARTTLS certificate configured: mail arrives in plaintext",
            "set [smtp] tls_cert and tls_key, or enable [acme] (see 'mxspool check tls')",
        )
        return
    if config.acme.enabled and not paths.cert.exists():
        yield _ok("certificate", "ACME has not issued one yet; serve obtains it")
        return
    try:
        pair = certinfo.read_pair(paths.cert, paths.key)
    except certinfo.CertificateError as exc:
        yield Finding("certificate", "fail", str(exc), "fix the files, then 'mxspool check tls'")
        return
    leaf = pair.leaf
    left = leaf.seconds_left()
    detail = f"{leaf.subject}, {', '.join(leaf.names) or 'no names'}"
    if left <= 0:
        yield Finding(
            "certificate", "fail", f"{detail}: expired", "renew it ('mxspool acme issue')"
        )
    elif left < config.smtp.tls_expiry_warning:
        yield Finding(
            "certificate",
            "warn",
            f"{detail}: {format_duration(left)} left",
            "renew it before the migration ends",
        )
    else:
        yield _ok("certificate", f"{detail}: matches its key, {left / 86400:.0f} days left")


# -- DNS, disk, clock ------------------------------------------------------------------------


def check_dns(config: Config) -> Iterator[Finding]:
    try:
        resolver = nameservers.configure(dns.resolver.Resolver, config.delivery.resolver)
    except dns.resolver.NoResolverConfiguration:
        yield Finding(
            "dns",
            "fail",
            "no system resolver is configured (/etc/resolv.conf has no nameserver)",
            "add a nameserver to /etc/resolv.conf, or set [delivery] resolver",
        )
        return
    where = config.delivery.resolver or "the system resolver"
    resolver.lifetime = DNS_TIMEOUT
    name = config.smtp.hostname or socket.getfqdn()
    try:
        resolver.resolve(name, "A", raise_on_no_answer=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers) as exc:
        if isinstance(exc, dns.resolver.NXDOMAIN):  # an answer all the same
            yield _ok("dns", f"{where} answers (no A record for {name})")
        else:
            yield Finding("dns", "fail", f"{where} refuses queries ({exc})", "fix the resolver")
    except dns.exception.Timeout:
        yield Finding(
            "dns",
            "fail",
            f"{where} did not answer within {DNS_TIMEOUT:g} s",
            "check /etc/resolv.conf or [delivery] resolver; MX routing and SPF need DNS",
        )
    except dns.exception.DNSException as exc:
        yield Finding("dns", "fail", f"{where}: {exc}", "check the resolver configuration")
    else:
        yield _ok("dns", f"{where} answers ({name})")


def check_disk(config: Config) -> Iterator[Finding]:
    directory = state_dir(config)
    probe = next((p for p in (directory, *directory.parents) if p.exists()), Path("/"))
    if not config.store.url.startswith("sqlite:///"):
        yield _ok("disk", "PostgreSQL store: watch the database server's disk instead")
        return
    free = shutil.disk_usage(probe).free
    minimum = config.store.min_free_space
    text = f"{free / 2**30:.1f} GiB free at {probe}, min_free_space {minimum / 2**30:.1f} GiB"
    if free < minimum:
        yield Finding(
            "disk",
            "fail",
            f"{text}: intake would answer 452 to every message",
            "free space, grow the disk, or lower [store] min_free_space",
        )
    elif free < 2 * minimum:
        yield Finding("disk", "warn", text, "a held backlog grows: plan for more room")
    else:
        yield _ok("disk", text)


def check_database(config: Config) -> Iterator[Finding]:
    """The PostgreSQL server's durability and maintenance settings, as mxspool's connection
    sees them (a SQLite store has nothing to ask a server)."""
    url = config.store.url
    if not is_postgres(url):
        yield _ok("database", f"SQLite store {sqlite_path(url)}: WAL, synchronous = FULL")
        return
    try:
        health = postgres_health(url, config.smtp.hostname)
    except StoreError as exc:
        yield Finding(
            "database",
            "fail",
            str(exc),
            "check [store] url, that the server runs and that it accepts this user",
        )
        return
    settings = health.settings
    if settings.get("synchronous_commit") == "off":
        yield Finding("database", "fail", "synchronous_commit = off", SYNCHRONOUS_COMMIT_OFF)
    elif settings.get("fsync") == "off":
        yield Finding(
            "database",
            "fail",
            "fsync = off: a crash of the database machine can lose or corrupt mail already "
            "acknowledged with 250",
            "set fsync = on in postgresql.conf, then SELECT pg_reload_conf()",
        )
    elif settings.get("full_page_writes") == "off":
        yield Finding(
            "database",
            "warn",
            "full_page_writes = off: a power loss in the middle of a page write can leave the "
            "database unreadable",
            "set full_page_writes = on in postgresql.conf, then SELECT pg_reload_conf()",
        )
    else:
        version = settings.get("server_version", "(version unknown)")
        yield _ok("database", f"PostgreSQL {version}: synchronous_commit and fsync on")
    yield from judge_vacuum(health)
    yield from judge_node_name(config.smtp.hostname, health)


def judge_node_name(name: str, health: ServerHealth) -> Iterator[Finding]:
    """Whether a running node of this spool already has this node's name (``store.nodename``:
    serve would wait for it, then refuse to start)."""
    if health.name_holder is None:
        yield _ok("node name", f"{name}: no running node of this spool has it")
        return
    yield Finding(
        "node name",
        "fail",
        f"a running node of this spool is named {name} (its connection from "
        f"{health.name_holder}): serve would not start",
        "give each node its own [smtp] hostname (docs/multi-node.md), or stop that node first "
        "(on a node that is serving, this is its own name: run doctor before serve)",
    )


def judge_vacuum(health: ServerHealth) -> Iterator[Finding]:
    """Whether the server reclaims the rows a release and a purge leave behind."""
    # A release turns every held recipient row into a dead tuple (an UPDATE is a new row
    # version) and purge deletes them; without autovacuum nobody reclaims them, so the claim
    # query and the status counts scan more and more of them as the release goes on.
    consequence = (
        "rows finished by a release or a purge stay as dead tuples nobody reclaims; claims and "
        "status slow down as the release goes on"
    )
    off = [name for name in ("autovacuum", "track_counts") if health.settings.get(name) == "off"]
    if off:
        yield Finding(
            "database maintenance",
            "warn",
            f"{' and '.join(f'{name} = off' for name in off)}: {consequence}",
            "; ".join(f"ALTER SYSTEM SET {name} = on" for name in off)
            + "; SELECT pg_reload_conf()",
        )
    elif health.no_autovacuum:
        tables = ", ".join(health.no_autovacuum)
        yield Finding(
            "database maintenance",
            "warn",
            f"autovacuum is turned off for {tables}: {consequence}",
            "; ".join(
                f"ALTER TABLE {name} RESET (autovacuum_enabled)" for name in health.no_autovacuum
            ),
        )
    else:
        yield _ok("database maintenance", "autovacuum on")


def _adjtimex_synchronised() -> bool | None:
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        buffer = ctypes.create_string_buffer(512)  # struct timex, modes = 0: read only
        state = libc.adjtimex(buffer)
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return bool(state != 5)  # TIME_ERROR: the kernel says the clock is not synchronised


def check_clock(_config: Config) -> Iterator[Finding]:
    synced: bool | None = None
    source = "adjtimex"
    if shutil.which("timedatectl"):
        try:
            answer = subprocess.run(
                ["timedatectl", "show", "--property=NTPSynchronized", "--value"],
                capture_output=True,
                text=True,
                timeout=CLOCK_TIMEOUT,
                check=False,
            )
            if answer.returncode == 0 and answer.stdout.strip() in ("yes", "no"):
                synced, source = answer.stdout.strip() == "yes", "timedatectl"
        except (OSError, subprocess.TimeoutExpired):
            pass
    if synced is None:
        synced = _adjtimex_synchronised()
    if synced is None:
        yield Finding("clock", "unknown", "cannot tell whether the clock is synchronised")
    elif synced:
        yield _ok("clock", f"synchronised ({source})")
    else:
        yield Finding(
            "clock",
            "warn",
            f"not synchronised ({source})",
            "enable NTP (timedatectl set-ntp true, or chrony)",
        )


CHECKS: tuple[Callable[[Config], Iterator[Finding]], ...] = (
    check_permissions,
    check_ports,
    check_certificate,
    check_dns,
    check_disk,
    check_database,
    check_clock,
)


def examine(config: Config) -> list[Finding]:
    """Every check's findings, in order; a check that breaks is a failed finding."""
    findings: list[Finding] = []
    for check in CHECKS:
        name = check.__name__.removeprefix("check_")
        try:
            findings.extend(check(config))
        except Exception as exc:  # a doctor that crashes helps nobody
            findings.append(Finding(name, "fail", f"the check itself failed: {exc}"))
    return findings


def failed(findings: list[Finding]) -> bool:
    return any(item.status == "fail" for item in findings)


def to_dicts(findings: list[Finding]) -> list[dict[str, str]]:
    return [asdict(item) for item in findings]
