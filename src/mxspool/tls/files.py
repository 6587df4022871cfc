"""Where the served certificate and key live, and how a new pair is put there atomically.

An operator's own files are ``[smtp] tls_cert`` / ``tls_key``. With ``[acme] enabled`` the pair
lives under ``cert_dir`` (default ``<state directory>/acme``) as ``live/fullchain.pem`` and
``live/privkey.pem``, where ``live`` is a symlink to one directory of ``archive/``. A new pair is
written into a fresh archive directory (key 0600, fsynced) and ``live`` is switched with one
rename, so a reader never sees a new key with an old certificate or a half-written file.

The state directory is ``$STATE_DIRECTORY`` (systemd's ``StateDirectory=``), else the directory
of the SQLite spool, else ``./mxspool-data``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from mxspool.config import Config

KEEP_ARCHIVES = 3
"""Archive directories kept (the live one and the ones before it, for a manual rollback)."""


@dataclass(frozen=True)
class CertPaths:
    cert: Path
    """PEM chain: the server certificate first, then its intermediates."""
    key: Path


def state_dir(config: Config) -> Path:
    env = os.environ.get("STATE_DIRECTORY", "")
    if env:
        return Path(env.split(":")[0])
    url = config.store.url
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///")).parent
    return Path("mxspool-data")


def acme_dir(config: Config) -> Path:
    return Path(config.acme.cert_dir) if config.acme.cert_dir else state_dir(config) / "acme"


def account_key_path(config: Config) -> Path:
    if config.acme.account_key:
        return Path(config.acme.account_key)
    return acme_dir(config) / "account.key"


def acme_paths(cert_dir: Path) -> CertPaths:
    return CertPaths(cert_dir / "live" / "fullchain.pem", cert_dir / "live" / "privkey.pem")


def served_paths(config: Config) -> CertPaths | None:
    """The pair STARTTLS serves, or None when STARTTLS is not configured."""
    if config.acme.enabled:
        return acme_paths(acme_dir(config))
    if config.smtp.tls_enabled:
        return CertPaths(Path(config.smtp.tls_cert), Path(config.smtp.tls_key))
    return None


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install_pair(cert_dir: Path, fullchain_pem: bytes, key_pem: bytes) -> CertPaths:
    """Make ``fullchain_pem`` + ``key_pem`` the live pair of ``cert_dir`` in one rename."""
    archive = cert_dir / "archive"
    archive.mkdir(parents=True, exist_ok=True, mode=0o700)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for attempt in range(1000):
        target = archive / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            target.mkdir(mode=0o700)
            break
        except FileExistsError:
            continue
    else:
        raise OSError(f"no free archive directory name under {archive}")
    _write(target / "privkey.pem", key_pem, 0o600)
    _write(target / "fullchain.pem", fullchain_pem, 0o644)
    _fsync_dir(target)
    link = cert_dir / "live"
    temporary = cert_dir / f".live.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    temporary.symlink_to(Path("archive") / target.name)
    os.replace(temporary, link)
    _fsync_dir(cert_dir)
    _prune(archive, keep=target.name)
    return acme_paths(cert_dir)


def _prune(archive: Path, keep: str) -> None:
    names = sorted(entry.name for entry in archive.iterdir() if entry.is_dir())
    for name in names[:-KEEP_ARCHIVES]:
        if name != keep:
            shutil.rmtree(archive / name, ignore_errors=True)
