"""``mxspool init [DIR]``: a starter configuration an operator edits rather than writes.

A new operator's first hour goes to finding which settings matter. ``init`` writes
``mxspool.toml`` with every section they must decide on, each key commented with what it does
and what to choose, valid as written; an admin token (random, mode 0600) the configuration
names as an ``[[admin.tokens]]`` entry, so the admin API is never open; and, with
``--self-signed HOSTNAME``, a self-signed certificate and key (key mode 0600) wired into
``[smtp] tls_cert``/``tls_key`` so STARTTLS works from the first start (senders doing
opportunistic TLS accept it; a real certificate or ACME replaces it later).

It never overwrites: every file it would write is checked first, and each is created with
O_EXCL, so a second run, or a race with another, changes nothing. On any error the files this
run created are removed again.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_NAME = "mxspool.toml"
TOKEN_NAME = "admin-token"
CERT_NAME = "tls.crt"
KEY_NAME = "tls.key"
TOKEN_OWNER = "admin"
"""The audit log's name for actions taken with the generated token."""
CERT_DAYS = 825
"""Validity of the self-signed certificate (the longest most clients still accept)."""

_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                       r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")  # fmt: skip


class InitError(Exception):
    """``init`` cannot write the starter files; the message says why and what to do."""


@dataclass(slots=True)
class Written:
    """What ``init`` wrote, for the summary."""

    config: Path
    token: Path
    hostname: str
    cert: Path | None = None
    key: Path | None = None
    files: list[Path] = field(default_factory=list)


def valid_hostname(name: str) -> bool:
    return bool(_HOSTNAME.match(name)) and not name.replace(".", "").isdigit()


def toml_string(value: str) -> str:
    """A TOML basic string (JSON's escapes, plus DEL, which TOML wants escaped too)."""
    return json.dumps(value).replace("\x7f", "\\u007f")


def init(
    directory: Path, *, self_signed: str | None = None, data_dir: Path | None = None
) -> Written:
    """Write the starter files into ``directory`` (created if missing); InitError if any of
    them exists already, or ``self_signed`` is not a host name."""
    if self_signed is not None and not valid_hostname(self_signed):
        raise InitError(
            f"--self-signed {self_signed!r} is not a host name; give this server's public DNS "
            "name, e.g. mx1.example.net"
        )
    directory = directory.expanduser().absolute()
    data = (data_dir.expanduser().absolute() if data_dir else directory / "data").as_posix()
    hostname = self_signed or socket.getfqdn()
    written = Written(
        config=directory / CONFIG_NAME, token=directory / TOKEN_NAME, hostname=hostname
    )
    if self_signed is not None:
        written.cert, written.key = directory / CERT_NAME, directory / KEY_NAME
    targets = [written.config, written.token, *(p for p in (written.cert, written.key) if p)]
    existing = [str(path) for path in targets if path.exists() or path.is_symlink()]
    if existing:
        raise InitError(
            f"not overwriting {', '.join(existing)}; move them away, or run init in another "
            "directory"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InitError(f"cannot create {directory}: {exc.strerror or exc}") from None
    try:
        _create(written.token, secrets.token_urlsafe(32) + "\n", 0o600, written)
        if written.cert is not None and written.key is not None:
            cert_pem, key_pem = self_signed_certificate(hostname)
            _create(written.key, key_pem, 0o600, written)
            _create(written.cert, cert_pem, 0o644, written)
        _create(written.config, starter_config(written, data), 0o644, written)
    except BaseException:
        for path in written.files:
            path.unlink(missing_ok=True)
        raise
    return written


def _create(path: Path, text: str, mode: int, written: Written) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise InitError(f"not overwriting {path}, which appeared meanwhile") from None
    except OSError as exc:
        raise InitError(f"cannot create {path}: {exc.strerror or exc}") from None
    written.files.append(path)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        os.fchmod(out.fileno(), mode)  # the umask must not loosen or tighten it
        out.write(text)
        out.flush()
        os.fsync(out.fileno())


def self_signed_certificate(hostname: str) -> tuple[str, str]:
    """(certificate PEM, private key PEM): RSA 2048 (every sending MTA speaks it), the host name
    as subject and only SAN, valid for CERT_DAYS, for TLS server use."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return cert_pem, key_pem


def starter_config(written: Written, data_dir: str) -> str:
    """The commented configuration; only keys of docs/interface.md, so it loads as written."""
    tls = (
        f"tls_cert = {toml_string(str(written.cert))}\ntls_key = {toml_string(str(written.key))}"
        if written.cert and written.key
        else '# tls_cert = "/etc/mxspool/tls.crt"\n# tls_key = "/etc/mxspool/tls.key"'
    )
    store_url = toml_string(f"sqlite:///{data_dir}/spool.db")
    return f"""\
# mxspool configuration, written by `mxspool init`. Every key is described in
# docs/interface.md; a key left out takes its default. Lines marked DECIDE need your answer
# before mail flows. Check the file with: mxspool --config {written.config} status

[smtp]
# DECIDE: this server's public DNS name. It is in the greeting and Received: headers, the MX
# record of every domain you hold points at it, and the TLS certificate must carry it.
hostname = {toml_string(written.hostname)}
# Where to accept mail. A public MX listens on port 25 on every address; port 25 needs root or
# CAP_NET_BIND_SERVICE (deploy/mxspool.service grants it). For a trial: ["127.0.0.1:2525"].
listen = ["0.0.0.0:25", "[::]:25"]
# Exchange Online accepts messages up to 150 MB; refuse nothing it would take.
max_message_size = "150MiB"
max_recipients = 1000
max_connections = 1000
max_connections_per_ip = 50
# STARTTLS is offered when both are set (PEM files readable by the service user). Senders
# doing opportunistic TLS accept a self-signed certificate; a connector that validates
# certificates needs a real one (or ACME, see docs).
{tls}

[store]
# DECIDE: one node keeps the spool in SQLite on a local disk (the directory is created on
# first start). Several nodes share PostgreSQL: "postgresql://mxspool@db.example.net/mxspool"
# (needs: pip install 'mxspool[postgres]').
url = {store_url}
# Below this much free disk, new mail gets 452 4.3.1 (senders retry) rather than a full disk.
min_free_space = "1GiB"

[delivery]
# Connections per destination, and the pace of a release ("0" = unpaced, or e.g. "600/min");
# `domain release --rate` overrides it per release.
concurrency = 10
rate = "0"
# Retries after a temporary failure (the last interval repeats), and how long after release a
# message may keep failing before it is parked for you to look at.
retry_schedule = ["1m", "5m", "15m", "30m", "1h"]
max_age = "14d"
connect_timeout = "30s"

[admin]
# The admin API and dashboard. Keep it on loopback and reach it through SSH or a reverse
# proxy; a non-loopback address needs a token (below) and, behind a proxy, allowed_hosts.
listen = "127.0.0.1:8025"
allowed_hosts = []

# Bearer tokens for the API (`Authorization: Bearer <token>`) and the dashboard sign-in. The
# name is what the audit log records for actions taken with it: give each person or script
# its own entry (token_file, or token = "..."; 16 characters at least).
[[admin.tokens]]
name = "{TOKEN_OWNER}"
token_file = {toml_string(str(written.token))}
"""


def next_steps(written: Written, config_option: str) -> str:
    """What to do after ``init``, for people."""
    lines = ["wrote:"]
    notes = {
        written.config: "the configuration: read it, answer each DECIDE",
        written.token: f"admin API token, named {TOKEN_OWNER!r} in the audit log (mode 0600)",
        written.cert: f"self-signed certificate for {written.hostname}",
        written.key: "its private key (mode 0600)",
    }
    for path in (p for p in notes if p in written.files):
        lines.append(f"  {path}  {notes.get(path, '')}".rstrip())
    cli = f"mxspool --config {config_option}"
    lines += [
        "",
        "next steps:",
        f"  1. Edit {written.config}: set [smtp] hostname (now {written.hostname!r}) to this "
        "server's public DNS name, and choose [store] url.",
        f"  2. Add each domain, held until its migration is ready:\n"
        f"       {cli} domain add example.com --hold \\\n"
        "         --route example-com.mail.protection.outlook.com",
        "  3. Start the service: under systemd, install deploy/mxspool.service and run\n"
        "       systemctl enable --now mxspool\n"
        "     (the service runs as user mxspool: `chgrp mxspool` the token and key files and\n"
        f"     `chmod 0640` them); or run it in the foreground: {cli} serve",
        "  4. DNS: give the host name an A/AAAA record (and its address a matching PTR), then\n"
        "     point the domain's MX at it when the migration starts; check with\n"
        f"       {cli} check dns example.com",
        f'  The admin API is on 127.0.0.1:8025: curl -H "Authorization: Bearer $(cat '
        f'{written.token})" http://127.0.0.1:8025/api/v1/status',
    ]
    return "\n".join(lines)
