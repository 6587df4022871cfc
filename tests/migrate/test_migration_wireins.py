"""``migration runbook``, ``migration release --dry-run`` and ``migration report --sign``: the
per-domain functions (runbook, release plan, signed ledger) given every domain of the
migration and its tenants, on a real SQLite store (and the test DNS server for the runbook)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from mxspool.store.base import RecipientState
from tests.migrate.conftest import Cli
from tests.test_cli import Spool

SPOOLER = "spool.example.net"
IP = "203.0.113.7"
DOMAINS = ("example.test", "longttl.test")  # in tests/migrate/conftest.py's zone


def _args(*domains: str) -> list[str]:
    return [part for name in domains for part in ("--domain", name)]


def test_runbook_names_every_domain_and_both_tenants(mxcli: Cli) -> None:
    for name in DOMAINS:
        mxcli("domain", "add", name, "--route", "mx.source.test", "--profile", "exchange-online")
    mxcli(
        "migration", "create", "move", *_args(*DOMAINS),
        "--source-tenant", "contoso.onmicrosoft.com", "--target-tenant", "Fabrikam-B",
    )  # fmt: skip
    spooler = ("--spooler-host", SPOOLER, "--spooler-ip", IP)
    text = mxcli("migration", "runbook", "move", *spooler).output
    assert text.startswith("# Tenant-to-tenant runbook for migration move")
    for name in DOMAINS:
        assert f"Confirm-MgDomain -DomainId '{name}'" in text
        assert f"mxspool domain hold {name}" in text
    assert "SOURCE tenant (contoso.onmicrosoft.com)" in text
    assert "TARGET tenant (Fabrikam-B)" in text
    # The source label is an initial domain, so it is used as one; the target's is not.
    assert "Update-MgDomain -DomainId 'contoso.onmicrosoft.com' -IsDefault" in text
    assert "TARGET-TENANT.onmicrosoft.com" in text
    # The MX seen now comes from DNS, per domain.
    assert "longttl.test: MX mx.source.test, TTL 3600 s" in text

    given = mxcli(
        "migration", "runbook", "move", *spooler, "--target-initial", "fabrikamb.onmicrosoft.com",
        "--format", "ps1",
    ).output  # fmt: skip
    assert "[string]$Step" in given and "TARGET-TENANT.onmicrosoft.com" not in given
    assert "fabrikamb.onmicrosoft.com" in given
    assert "example.test" in given and "longttl.test" in given

    # Audited per domain as the checklist's plan step.
    audit = json.loads(mxcli("audit", "--json").output)
    assert sorted(e["target"] for e in audit if e["action"] == "runbook") == sorted(DOMAINS * 2)
    # Refusals: an unknown migration, a bad initial domain, a bad IP; nothing printed.
    assert "no migration nope" in mxcli("migration", "runbook", "nope", *spooler, code=1).output
    bad = mxcli("migration", "runbook", "move", *spooler, "--source-initial", "x.test", code=2)
    assert "initial domain" in bad.output
    mxcli("migration", "runbook", "move", "--spooler-host", SPOOLER, "--spooler-ip", "x", code=2)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path)
    # A small per-recipient limit makes the per-recipient ETAs large and distinct.
    with spool.config.open("a") as config:
        config.write("[delivery]\nper_recipient_hourly_limit = 60\n")
    for name in ("one.test", "two.test"):
        spool.run(
            "domain", "add", name, "--route", "127.0.0.1:2526", "--tls", "off",
            "--profile", "exchange-online", "--hold",
        )  # fmt: skip
    return spool


def _plan(spool: Spool, *args: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        spool.run("migration", "release", "move", "--dry-run", "--json", *args).stdout
    )
    return data


def test_release_dry_run_per_recipient_eta_is_the_max(spool: Spool) -> None:
    spool.run("migration", "create", "move", *_args("one.test", "two.test"))
    for _ in range(20):
        spool.put("busy@one.test")
    for _ in range(5):
        spool.put("quiet@two.test")
    spool.put("a@two.test", "b@one.test")

    plan = _plan(spool, "--rate", "6000/min")
    assert plan["messages"] == 27 and plan["shared_rate"] is False
    rows = {d["domain"]: {r["address"]: r for r in d["recipients"]} for d in plan["domains"]}
    assert set(rows["one.test"]) == {"busy@one.test", "b@one.test"}
    assert set(rows["two.test"]) == {"quiet@two.test", "a@two.test"}
    assert rows["one.test"]["busy@one.test"]["messages"] == 20
    busy = rows["one.test"]["busy@one.test"]["eta_s"]
    quiet = rows["two.test"]["quiet@two.test"]["eta_s"]
    assert busy > quiet > 0  # 60/h: a minute per message beyond the burst
    assert rows["two.test"]["a@two.test"]["eta_s"] < quiet
    # The overall ETA is the slowest mailbox, not the sum of them.
    assert plan["eta_s"] == busy == max(d["eta_s"] for d in plan["domains"])
    assert plan["eta_s"] < busy + quiet

    # A slow rate bounds it instead: each domain its own, one.test's 21 messages at 1/min.
    slow = _plan(spool, "--rate", "1/min")["eta_s"]
    assert slow == pytest.approx(21 * 60, abs=1) and slow > busy

    # The table shows both domains and the overall line; nothing was changed.
    table = spool.run("migration", "release", "move", "--dry-run", "--rate", "6000/min").stdout
    assert "busy@one.test" in table and "quiet@two.test" in table and "overall: 27" in table
    assert {d["mode"] for d in spool.json("domain", "list")} == {"hold"}
    assert not [e for e in spool.json("audit") if e["action"] == "migration.release"]
    spool.run("migration", "release", "move", "--dry-run", "--rate", "fast", code=2)
    spool.run("migration", "release", "move", "--dry-run", "--at", "+1h", code=2)
    spool.run("migration", "release", "move", "--json", code=2)

    # One target tenant: the domains share its rate (the plan says so).
    spool.run("migration", "remove", "move")
    spool.run(
        "migration", "create", "move", *_args("one.test", "two.test"), "--target-tenant", "fab"
    )
    shared = _plan(spool, "--rate", "1/min")
    assert shared["shared_rate"] is True and shared["eta_s"] == pytest.approx(27 * 60, abs=1)
    # Control: the release itself still works after the plans.
    spool.run("migration", "release", "move")
    assert {d["mode"] for d in spool.json("domain", "list")} == {"relay"}


def test_report_sign_verifies_and_a_tampered_copy_fails(spool: Spool, tmp_path: Path) -> None:
    spool.run("domain", "add", "other.test", "--route", "127.0.0.1:2526")
    spool.run("migration", "create", "move", *_args("one.test", "two.test"))
    spool.put("a@one.test", "b@two.test")
    spool.put("c@other.test")  # not in the migration: not in its ledger
    spool.run("domain", "release", "one.test")
    assert spool.finish("one.test", RecipientState.DELIVERED) == 1
    key = tmp_path / "ledger.key"
    spool.run("ledger", "keygen", "--out", str(key))
    ledger = tmp_path / "move.csv"

    spool.run("migration", "report", "move", "--sign", "--key", str(key), "--out", str(ledger))
    ok = spool.run("ledger", "verify", str(ledger)).output
    assert "OK:" in ok and "2 rows" in ok and "one.test, two.test" in ok
    manifest = json.loads(ledger.with_name("move.csv.manifest.json").read_text())
    assert manifest["scope"]["migration"] == "move"
    with ledger.open(newline="", encoding="utf-8") as source:
        rows = list(csv.DictReader(source))
    assert sorted(row["rcpt"] for row in rows) == ["a@one.test", "b@two.test"]

    # A copy with one state changed does not hold up.
    tampered = tmp_path / "tampered.csv"
    for suffix in ("", ".manifest.json", ".manifest.sig"):
        shutil.copyfile(f"{ledger}{suffix}", f"{tampered}{suffix}")
    tampered.write_text(tampered.read_text().replace("delivered", "bounced", 1))
    assert "does NOT hold up" in spool.run("ledger", "verify", str(tampered), code=1).output

    # --check: signed, and exit 1 while a row is not final; the usage errors.
    checked = tmp_path / "check.csv"
    spool.run(
        "migration", "report", "move", "--sign", "--check", "--key", str(key),
        "--out", str(checked), code=1,
    )  # fmt: skip
    assert "OK:" in spool.run("ledger", "verify", str(checked)).output
    spool.run("migration", "report", "move", "--sign", "--key", str(key), code=2)
    spool.run("migration", "report", "move", "--out", str(checked), code=2)
    spool.run("migration", "report", "nope", "--sign", "--key", str(key), "--out", "x", code=1)
