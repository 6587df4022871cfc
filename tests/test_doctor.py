"""``mxspool doctor`` on a real configuration: a clean set-up passes (exit 0), and each planted
fault is found with its fix (exit 1): a world-readable token file, a certificate whose key is
not its own, a port another program holds; a port our own running server holds is fine."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MXSPOOL, Spooler
from tests.delivery.dnsserver import DnsServer


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer("mx.test. 60 IN A 127.0.0.1\n").start()
    yield server
    server.stop()


@pytest.fixture
def setup(tmp_path: Path, dns: DnsServer, spooler_factory: Any) -> Spooler:
    """A configuration with a self-signed certificate, a token file and the test resolver."""
    made = tmp_path / "made"
    subprocess.run(
        [MXSPOOL, "init", str(made), "--self-signed", "mx.test"], check=True, capture_output=True
    )
    node: Spooler = spooler_factory(
        smtp={"tls_cert": str(made / "tls.crt"), "tls_key": str(made / "tls.key")},
        admin={"token_file": str(made / "admin-token")},
        delivery={"resolver": dns.address},
    )
    return node


def doctor(node: Spooler) -> tuple[int, dict[str, dict[str, str]]]:
    result = node.cli("doctor", "--json", check=False)
    data = json.loads(result.stdout)
    assert data["ok"] == (result.returncode == 0)
    return result.returncode, {item["check"]: item for item in data["checks"]}


def test_a_clean_setup_passes(setup: Spooler) -> None:
    code, checks = doctor(setup)
    assert code == 0, checks
    for name in ("configuration", "state dir", "[smtp] tls_key", "[admin] token_file", "dns"):
        assert checks[name]["status"] == "ok", checks[name]
    assert (
        checks["certificate"]["status"] == "ok"
        and "matches its key" in checks["certificate"]["detail"]
    )
    assert checks["clock"]["status"] in ("ok", "warn", "unknown")  # never a failure
    assert {c for c in checks if c.startswith("port ")} == {
        f"port smtp 127.0.0.1:{setup.port}", f"port admin 127.0.0.1:{setup.admin_port}"
    }  # fmt: skip


def test_finds_a_world_readable_token_file(setup: Spooler, tmp_path: Path) -> None:
    token = tmp_path / "made" / "admin-token"
    token.chmod(0o644)
    code, checks = doctor(setup)
    assert code == 1
    found = checks["[admin] token_file"]
    assert found["status"] == "fail" and "0644" in found["detail"]
    assert found["fix"] == f"chmod 600 {token}"
    text = setup.cli("doctor", check=False).stdout  # the table says the same
    assert "FAIL" in text and f"fix: chmod 600 {token}" in text


def test_finds_a_certificate_that_does_not_match_its_key(setup: Spooler, tmp_path: Path) -> None:
    other = tmp_path / "other"
    subprocess.run(
        [MXSPOOL, "init", str(other), "--self-signed", "mx.test"], check=True, capture_output=True
    )
    (tmp_path / "made" / "tls.key").write_bytes((other / "tls.key").read_bytes())
    code, checks = doctor(setup)
    assert code == 1
    assert checks["certificate"]["status"] == "fail"
    assert "does not belong" in checks["certificate"]["detail"]


def test_ports_held_by_others_fail_and_by_our_server_pass(setup: Spooler) -> None:
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", setup.port))
    squatter.listen()
    try:
        code, checks = doctor(setup)
    finally:
        squatter.close()
    held = checks[f"port smtp 127.0.0.1:{setup.port}"]
    assert code == 1 and held["status"] == "fail" and "ss -ltnp" in held["fix"]

    setup.start()
    code, checks = doctor(setup)
    assert code == 0, checks
    ours = checks[f"port smtp 127.0.0.1:{setup.port}"]
    assert ours["status"] == "ok" and "our server" in ours["detail"]
