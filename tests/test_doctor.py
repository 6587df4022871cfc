"""``mxspool doctor`` on a real configuration: a clean set-up passes (exit 0), and each planted
fault is found with its fix (exit 1): a world-readable token file, a certificate whose key is
not its own, a port another program holds; a port our own running server holds is fine."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from mxspool import doctor as doctor_module
from mxspool.store import postgres_health
from tests.conftest import MXSPOOL, Spooler
from tests.delivery.dnsserver import DnsServer
from tests.store.conftest import pg_server, pg_url  # noqa: F401  (fixtures)


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


# -- the database server (PostgreSQL) ------------------------------------------------------


def test_postgres_durability_and_autovacuum_are_judged(
    spooler_factory: Any,
    pg_url: str,  # noqa: F811
) -> None:
    node: Spooler = spooler_factory(store={"url": pg_url, "min_free_space": "0"})
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526")  # creates the tables
    with psycopg.connect(pg_url, autocommit=True) as conn:
        autovacuum = conn.execute("SHOW autovacuum").fetchone()
        track_counts = conn.execute("SHOW track_counts").fetchone()
    assert autovacuum is not None and track_counts is not None
    server_vacuums = autovacuum[0] == "on" and track_counts[0] == "on"

    _, checks = doctor(node)
    database, maintenance = checks["database"], checks["database maintenance"]
    assert database["status"] == "ok" and "PostgreSQL" in database["detail"], database
    # This machine's server may run without autovacuum: then doctor must say so, with the fix.
    if server_vacuums:
        assert maintenance["status"] == "ok", maintenance
    else:
        assert maintenance["status"] == "warn" and "dead tuples" in maintenance["detail"]
        assert "ALTER SYSTEM SET" in maintenance["fix"] and "pg_reload_conf" in maintenance["fix"]

    # One of our tables with autovacuum off is found (none before: the control) and named,
    # with the statement that turns it on again.
    assert postgres_health(pg_url).no_autovacuum == []
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE recipients SET (autovacuum_enabled = off)")
    health = postgres_health(pg_url)
    assert health.no_autovacuum == ["recipients"]
    _, checks = doctor(node)
    maintenance = checks["database maintenance"]
    assert maintenance["status"] == "warn", maintenance
    # A server-wide "off" is reported first (it covers the table too); the table's own finding,
    # as doctor words it on a server that does vacuum:
    vacuuming = replace(health, settings={**health.settings, "autovacuum": "on"})
    (finding,) = doctor_module.judge_vacuum(vacuuming)
    assert finding.status == "warn" and "recipients" in finding.detail
    assert finding.fix == "ALTER TABLE recipients RESET (autovacuum_enabled)"
    if server_vacuums:
        assert maintenance == asdict(finding)


def test_a_node_name_a_running_node_has_fails(
    spooler_factory: Any,
    pg_url: str,  # noqa: F811
) -> None:
    # mx2 is being set up with mx1's configuration copied, name and all, while mx1 serves.
    store = {"url": pg_url, "min_free_space": "0"}
    running: Spooler = spooler_factory(smtp={"hostname": "mx1.test.local"}, store=store)
    running.start()
    copied: Spooler = spooler_factory(smtp={"hostname": "mx1.test.local"}, store=store)
    code, checks = doctor(copied)
    assert code == 1
    finding = checks["node name"]
    assert finding["status"] == "fail" and "127.0.0.1" in finding["detail"], finding
    assert "own [smtp] hostname" in finding["fix"]
    # The control: under a name of its own it passes.
    renamed: Spooler = spooler_factory(smtp={"hostname": "mx2.test.local"}, store=store)
    _, checks = doctor(renamed)
    assert checks["node name"]["status"] == "ok", checks["node name"]


def test_postgres_without_synchronous_commit_fails(
    spooler_factory: Any,
    pg_url: str,  # noqa: F811
) -> None:
    # The role's or the URL's synchronous_commit = off: serve refuses to open, doctor says why.
    marker = "options=-csearch_path%3D"
    assert marker in pg_url
    url = pg_url.replace(marker, "options=-csynchronous_commit%3Doff%20-csearch_path%3D")
    node: Spooler = spooler_factory(store={"url": url, "min_free_space": "0"})
    code, checks = doctor(node)
    assert code == 1
    assert checks["database"]["status"] == "fail", checks["database"]
    assert "synchronous_commit = on" in checks["database"]["fix"]
    # The control: the same database through the unchanged URL passes.
    node_ok: Spooler = spooler_factory(store={"url": pg_url, "min_free_space": "0"})
    _, checks = doctor(node_ok)
    assert checks["database"]["status"] == "ok", checks["database"]


def test_an_unreachable_postgres_fails_with_the_fix(spooler_factory: Any) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://postgres@127.0.0.1:{port}/test?connect_timeout=3"
    node: Spooler = spooler_factory(store={"url": url, "min_free_space": "0"})
    code, checks = doctor(node)
    assert code == 1
    database = checks["database"]
    assert database["status"] == "fail" and "cannot connect" in database["detail"], database
    assert "[store] url" in database["fix"]
