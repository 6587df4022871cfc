"""The STARTTLS certificate is reloaded without a restart: when its files change (within the
poll interval), at once on SIGHUP, and never to a broken pair (the old one stays, an ERROR says
why). New connections get the new certificate; a session already in TLS keeps working."""

from __future__ import annotations

import datetime
import os
import signal
from pathlib import Path
from typing import Any

import trustme

from tests.conftest import Spooler
from tests.e2e.tls_client import served_serial, starttls
from tests.waiting import stays, wait_until

HOSTNAME = "mx.test.local"


def write_pair(ca: trustme.CA, directory: Path, days: int = 90) -> int:
    """A new certificate for HOSTNAME into directory/{cert,key}.pem, each replaced by a rename
    (the key first); its serial."""
    leaf = ca.issue_cert(
        HOSTNAME,
        not_after=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days),
    )
    for name, blob in (("key.pem", leaf.private_key_pem), ("cert.pem", leaf.cert_chain_pems[0])):
        temporary = directory / f".{name}.new"
        blob.write_to_path(str(temporary))
        os.replace(temporary, directory / name)
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return int(cert.serial_number)


def spooler_with_tls(
    factory: Any, tmp_path: Path, interval: str
) -> tuple[Spooler, trustme.CA, int]:
    ca = trustme.CA()
    certs = tmp_path / "certs"
    certs.mkdir()
    serial = write_pair(ca, certs)
    node: Spooler = factory(
        smtp={
            "tls_cert": str(certs / "cert.pem"),
            "tls_key": str(certs / "key.pem"),
            "tls_reload_interval": interval,
            "tls_expiry_warning": "30d",
        },
    )
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:9", "--tls", "off", "--hold")
    node.start()
    return node, ca, serial


def test_changed_files_reach_new_connections(spooler_factory: Any, tmp_path: Path) -> None:
    node, ca, first = spooler_with_tls(spooler_factory, tmp_path, "0.2s")
    assert served_serial(node.port) == first
    left = node.metric("mxspool_tls_certificate_expiry_seconds")
    assert 89 * 86400 < left <= 90 * 86400
    session = starttls(node.port)
    assert session.cert.serial_number == first

    second = write_pair(ca, tmp_path / "certs", days=10)
    wait_until(lambda: served_serial(node.port) == second, 20, "the new certificate served")
    # Under the 30-day threshold: a clear WARNING line, and the gauge follows.
    wait_until(lambda: "WARNING mxspool.tls: TLS certificate" in node.log.read_text(), 5)
    assert "expires in 10.0 days" in node.log.read_text()
    assert node.metric("mxspool_tls_certificate_expiry_seconds") < 10 * 86400

    assert session.command("NOOP").startswith("250")  # the encrypted session goes on
    assert session.command("MAIL FROM:<a@src.test>").startswith("250")
    assert session.command("RCPT TO:<b@example.test>").startswith("250")
    session.close()


def test_sighup_reloads_at_once(spooler_factory: Any, tmp_path: Path) -> None:
    node, ca, first = spooler_with_tls(spooler_factory, tmp_path, "1h")  # no polling to speak of
    second = write_pair(ca, tmp_path / "certs")
    stays(lambda: served_serial(node.port) == first, 1.0, "the old certificate without SIGHUP")
    assert node.proc is not None
    node.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: served_serial(node.port) == second, 5, "the certificate after SIGHUP")
    assert "TLS certificate loaded (SIGHUP)" in node.log.read_text()
    assert node.proc.poll() is None


def test_a_broken_pair_keeps_the_old_certificate(spooler_factory: Any, tmp_path: Path) -> None:
    node, ca, first = spooler_with_tls(spooler_factory, tmp_path, "0.2s")
    certs = tmp_path / "certs"
    other = trustme.CA().issue_cert(HOSTNAME)
    broken = [
        ("cert.pem", b"-----BEGIN CERTIFICATE-----\nnot base64\n", "no readable PEM certificate"),
        ("key.pem", other.private_key_pem.bytes(), "does not belong to the first certificate"),
    ]
    good_cert, good_key = (certs / "cert.pem").read_bytes(), (certs / "key.pem").read_bytes()
    for name, content, message in broken:
        (certs / name).write_bytes(content)
        wait_until(lambda m=message: m in node.log.read_text(), 20, f"the error {message!r}")
        assert "still serving the previous certificate" in node.log.read_text()
        stays(lambda: served_serial(node.port) == first, 0.6, "the old certificate in use")
        (certs / "cert.pem").write_bytes(good_cert)
        (certs / "key.pem").write_bytes(good_key)
    # Positive control: the same watcher does load a good new pair.
    third = write_pair(ca, certs)
    wait_until(lambda: served_serial(node.port) == third, 20, "the good new certificate")
    assert "ERROR mxspool.tls: TLS certificate not reloaded (the files changed)" in (
        node.log.read_text()
    )


def test_serve_refuses_to_start_with_a_broken_pair(spooler_factory: Any, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "cert.pem").write_text("garbage")
    (certs / "key.pem").write_text("garbage")
    node: Spooler = spooler_factory(
        smtp={"tls_cert": str(certs / "cert.pem"), "tls_key": str(certs / "key.pem")}
    )
    import subprocess

    from tests.conftest import MXSPOOL

    result = subprocess.run(
        [MXSPOOL, "--config", str(node.config), "serve"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "STARTTLS cannot start" in result.stderr
    assert "no readable PEM certificate" in result.stderr
