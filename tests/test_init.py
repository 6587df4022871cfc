"""``mxspool init``: the starter files load with the real loaders, run a real node, keep their
secrets private, and are never overwritten."""

from __future__ import annotations

import ipaddress
import os
import re
import smtplib
import ssl
import stat
import subprocess
import tomllib
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mxspool.admin import check_config
from mxspool.admin.auth import load_tokens
from mxspool.cli import cli
from mxspool.config import load_config, split_host_port
from tests.conftest import MXSPOOL, free_ports, quiet_resolver, wait_for_port
from tests.waiting import wait_until


def init(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``mxspool init`` in its own process, as an operator runs it."""
    return subprocess.run(
        [MXSPOOL, "init", *args], capture_output=True, text=True, timeout=60, check=False, cwd=cwd
    )


def init_here(*args: str) -> Result:
    """``mxspool init`` through click in this process (no interpreter start: faster)."""
    return CliRunner().invoke(cli, ["init", *args])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_with_a_self_signed_certificate(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    result = init(str(etc), "--self-signed", "mx1.example.net", "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 0, result.stderr
    for step in ("hostname", "domain add", "systemctl enable --now mxspool", "DNS", "MX"):
        assert step in result.stdout, step

    config = load_config(str(etc / "mxspool.toml"))  # the real loader: valid as written
    assert config.smtp.hostname == "mx1.example.net"
    assert config.smtp.tls_cert == str(etc / "tls.crt") and config.smtp.tls_key == str(
        etc / "tls.key"
    )
    assert config.store.url == f"sqlite:///{tmp_path / 'd'}/spool.db"
    check_config(config)  # the admin plane accepts it (token readable, listener allowed)
    (token,) = load_tokens(config.admin)
    secret = (etc / "admin-token").read_text().strip()
    assert token.name == "admin" and token.secret == secret.encode() and len(secret) >= 40
    assert mode(etc / "admin-token") == 0o600
    assert mode(etc / "tls.key") == 0o600

    # Every section an operator decides on is there, commented.
    text = (etc / "mxspool.toml").read_text()
    assert set(tomllib.loads(text)) >= {"smtp", "store", "delivery", "admin"}
    assert text.count("DECIDE") >= 2 and text.count("\n#") > 20

    cert = x509.load_pem_x509_certificate((etc / "tls.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["mx1.example.net"]
    key = serialization.load_pem_private_key((etc / "tls.key").read_bytes(), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
        etc / "tls.crt", etc / "tls.key"
    )


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    assert init_here(str(tmp_path)).exit_code == 0
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    again = init_here(str(tmp_path), "--self-signed", "mx.example.net")
    assert again.exit_code == 1
    assert "not overwriting" in again.stderr and "mxspool.toml" in again.stderr
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    assert after == before  # nothing written, not even the certificate that was missing

    # One file of the set in the way is enough, and the others are not written either.
    other = tmp_path / "other"
    other.mkdir()
    (other / "admin-token").write_text("mine\n")
    blocked = init_here(str(other))
    assert blocked.exit_code == 1 and "admin-token" in blocked.stderr
    assert sorted(p.name for p in other.iterdir()) == ["admin-token"]
    assert (other / "admin-token").read_text() == "mine\n"


def test_init_defaults_and_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No DIR: the current directory; no certificate: TLS left commented out, still valid.
    monkeypatch.chdir(tmp_path)
    result = init_here()
    assert result.exit_code == 0, result.output
    config = load_config(str(tmp_path / "mxspool.toml"))
    assert not config.smtp.tls_enabled
    assert config.store.url == f"sqlite:///{tmp_path}/data/spool.db"
    assert not (tmp_path / "tls.key").exists()

    for name in ("not a host/name", "-x.example", "a" * 64 + ".example", "192.0.2.1", ""):
        bad = init_here(str(tmp_path / "x"), "--self-signed", name)
        assert bad.exit_code == 1 and "not a host name" in bad.stderr, name
    assert not (tmp_path / "x").exists()


def test_the_starter_runs_a_node(tmp_path: Path) -> None:
    # The starter as written, with only the listen addresses moved to free loopback ports
    # (the edit an operator makes for a trial): STARTTLS with its certificate, a held message,
    # the admin API with its token.
    etc = tmp_path / "etc"
    assert init_here(str(etc), "--self-signed", "mx1.example.net").exit_code == 0
    smtp_port, admin_port = free_ports(2)
    path = etc / "mxspool.toml"
    text = path.read_text()
    # The starter's public SMTP listen line (every address, port 25) becomes one loopback port.
    text, moved = re.subn(
        r'^listen = \[.*:25"\]$', f'listen = ["127.0.0.1:{smtp_port}"]', text, flags=re.M
    )
    assert moved == 1
    text = text.replace('listen = "127.0.0.1:8025"', f'listen = "127.0.0.1:{admin_port}"')
    # Background lookups go to the test's quiet DNS server, not the machine's resolver.
    text = text.replace("[delivery]\n", f'[delivery]\nresolver = "{quiet_resolver()}"\n', 1)
    path.write_text(text)
    loaded = load_config(str(path))
    assert loaded.delivery.resolver == quiet_resolver()
    hosts = [split_host_port(address)[0] for address in loaded.smtp.listen]
    hosts.append(split_host_port(loaded.admin.listen)[0])
    assert all(ipaddress.ip_address(host).is_loopback for host in hosts), hosts  # binds loopback
    config = ["--config", str(path)]
    subprocess.run([MXSPOOL, *config, "domain", "add", "example.com", "--mx", "--hold"], check=True)
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen([MXSPOOL, *config, "serve"], stderr=log, stdout=log)
    try:
        wait_for_port(smtp_port, proc=proc)
        context = ssl.create_default_context(cafile=str(etc / "tls.crt"))
        context.check_hostname = False  # smtplib checks against 127.0.0.1; the CA pins it
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as client:
            client.starttls(context=context)
            client.sendmail("a@src.test", ["b@example.com"], b"Subject: hi\r\n\r\nbody\r\n")
        token = (etc / "admin-token").read_text().strip()
        url = f"http://127.0.0.1:{admin_port}/api/v1/status"

        def held() -> bool:
            try:
                response = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5)
            except httpx.HTTPError:
                return False
            return response.status_code == 200 and '"held":1' in response.text.replace(" ", "")

        wait_until(held, 20, "the message held, seen through the admin API with the token")
        anonymous = httpx.get(url, timeout=5)
        assert anonymous.status_code == 401  # the starter's admin API is not open
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    assert os.path.exists(tmp_path / "etc" / "data" / "spool.db")
