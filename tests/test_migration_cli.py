"""``mxspool migration ...`` on a real SQLite store, and with a running serve: three domains
held and released together, audited once, stages recorded as events, one report, and a
scheduled release (``--at``) performed by the serve."""

from __future__ import annotations

import csv
import io
import json
import smtplib
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from mxspool.store.base import RecipientState
from tests.conftest import Spooler
from tests.delivery.target import Target
from tests.test_cli import Spool
from tests.waiting import stays, wait_until

DOMAINS = ("one.test", "three.test", "two.test")  # a migration lists its domains sorted


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path)
    for name in (*DOMAINS, "extra.test"):
        spool.run("domain", "add", name, "--route", "127.0.0.1:2526", "--tls", "off")
    return spool


def _args(*domains: str) -> list[str]:
    return [part for name in domains for part in ("--domain", name)]


def _audit(spool: Spool, action: str) -> list[dict[str, Any]]:
    return [e for e in spool.json("audit", "--limit", "200") if e["action"] == action]


def _show(spool: Spool, name: str = "move") -> dict[str, Any]:
    data: dict[str, Any] = spool.json("migration", "show", name)
    return data


def _by_domain(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["domain"]: item for item in data["domain_details"]}


def test_create_change_and_remove(spool: Spool) -> None:
    made = spool.json(
        "migration", "create", "Move", *_args(*DOMAINS),
        "--source-tenant", "contoso.onmicrosoft.com", "--target-tenant", "fabrikam",
    )  # fmt: skip
    assert made["name"] == "move" and made["domains"] == list(DOMAINS)
    assert (
        made["source_tenant"] == "contoso.onmicrosoft.com" and made["target_tenant"] == "fabrikam"
    )
    created = _audit(spool, "migration.create")
    assert len(created) == 1 and created[0]["target"] == "move"
    assert "one.test,three.test,two.test" in created[0]["detail"]
    # A domain is in one migration at most; an unknown one is refused; nothing is made.
    taken = spool.run("migration", "create", "other", "--domain", "two.test", code=1)
    assert "already belongs to migration move" in taken.stderr
    spool.run("migration", "create", "other", "--domain", "nowhere.test", code=1)
    spool.run("migration", "create", "bad name!", "--domain", "extra.test", code=2)
    assert [m["name"] for m in spool.json("migration", "list")] == ["move"]

    spool.run("migration", "add-domain", "move", "extra.test")
    assert _show(spool)["domains"] == sorted([*DOMAINS, "extra.test"])
    spool.run("migration", "remove-domain", "move", "extra.test")
    assert _show(spool)["domains"] == list(DOMAINS)
    spool.run("migration", "remove-domain", "move", "extra.test", code=1)
    assert "fabrikam" in spool.run("migration", "list").stdout

    spool.run("migration", "remove", "move")
    assert spool.json("migration", "list") == []
    spool.run("migration", "show", "move", code=1)
    # The domains stay configured.
    assert len(spool.json("domain", "list")) == 4


def test_hold_and_release_all_at_once_audited_once(spool: Spool) -> None:
    spool.run("migration", "create", "move", *_args(*DOMAINS))
    for name in DOMAINS:
        spool.put(f"a@{name}", f"b@{name}")
    spool.put("c@extra.test")  # not in the migration: never touched

    spool.run("migration", "hold", "move")
    modes = {d["domain"]: d["mode"] for d in spool.json("domain", "list")}
    assert modes == {**dict.fromkeys(DOMAINS, "hold"), "extra.test": "relay"}
    holds = _audit(spool, "migration.hold")
    assert len(holds) == 1 and holds[0]["target"] == "move"
    assert not _audit(spool, "domain.hold")  # once for the migration, not per domain
    data = _show(spool)
    assert data["totals"]["held"] == 6
    assert {d["stage"] for d in data["domain_details"]} == {"holding"}

    # Report: one ledger over every domain, a domain column first.
    rows = list(csv.DictReader(io.StringIO(spool.run("migration", "report", "move").stdout)))
    assert sorted(row["domain"] for row in rows) == sorted([*DOMAINS, *DOMAINS])
    assert {row["state"] for row in rows} == {"held"}
    check = spool.run("migration", "report", "move", "--check", code=1)
    assert "6 of 6 recipients not final" in check.stderr

    out = spool.run("migration", "release", "move", "--rate", "120/min").stdout
    assert "move released" in out and "120/min" in out
    domains = {d["domain"]: d for d in spool.json("domain", "list")}
    for name in DOMAINS:
        assert domains[name]["mode"] == "relay" and domains[name]["rate_per_s"] == 2.0
        assert domains[name]["released_at"]
    assert domains["extra.test"]["released_at"] is None
    releases = _audit(spool, "migration.release")
    assert len(releases) == 1 and "rate=120/min" in releases[0]["detail"]
    assert "was_held=one.test,three.test,two.test" in releases[0]["detail"]
    assert _show(spool)["release_rate_per_s"] == 2.0

    # Stages as events, in order, naming the migration.
    for name, item in _by_domain(_show(spool)).items():
        assert [e["stage"] for e in item["events"]] == ["planned", "holding", "released"], name
        assert {e["migration"] for e in item["events"][1:]} == {"move"}
        assert item["stage"] == "released"
    assert {row["domain"]: row["stage"] for row in spool.json("status")["domains"]} == {
        **dict.fromkeys(DOMAINS, "released"),
        "extra.test": "planned",
    }

    # Delivered everywhere: report --check passes and lists every domain's rows.
    for name in DOMAINS:
        assert spool.finish(name, RecipientState.DELIVERED) == 2
    spool.run("migration", "report", "move", "--check")
    ledger = json.loads(spool.run("migration", "report", "move", "--format", "json").stdout)
    assert len(ledger) == 6 and {row["state"] for row in ledger} == {"delivered"}


def test_route_canary_steps_and_schedule_without_serve(spool: Spool) -> None:
    spool.run("migration", "create", "move", *_args(*DOMAINS))
    spool.run("migration", "hold", "move")
    spool.run("migration", "route", "move", "--route", "target.example:2525", "--tls", "require")
    for item in spool.json("domain", "list"):
        if item["domain"] in DOMAINS:
            assert (item["routes"], item["tls"]) == (["target.example:2525"], "require")
    assert len(_audit(spool, "migration.route")) == 1
    spool.run("migration", "route", "move", code=2)  # nothing to change

    # Canary: one recipient; its domain stays in hold.
    spool.put("canary@two.test", "other@two.test")
    out = spool.run("migration", "release", "move", "--only", "canary@two.test").stdout
    assert "released 1 recipient for canary@two.test" in out
    assert {d["mode"] for d in spool.json("domain", "list") if d["domain"] in DOMAINS} == {"hold"}
    spool.run("migration", "release", "move", "--only", "x@extra.test", code=2)

    # Manual steps are events too, shown by show; they do not move the stage.
    spool.run("migration", "step", "move", "one.test", "detached", "--note", "ticket 42")
    spool.run("migration", "step", "move", "extra.test", "attached", code=2)
    spool.run("migration", "step", "move", "one.test", "gone", code=2)
    one = _by_domain(_show(spool))["one.test"]
    assert one["steps"]["detached"]["detail"] == "ticket 42" and one["stage"] == "holding"
    assert "detached" in spool.run("migration", "show", "move").stdout

    # A schedule is stored and shown; cancel removes it; bad times are refused.
    spool.run("migration", "release", "move", "--at", "+1h", "--rate", "60/min")
    assert _show(spool)["release_at"] is not None
    assert "scheduled at" in spool.run("migration", "show", "move").stdout
    spool.run("migration", "release", "move", "--at", "2001-01-01T00:00:00Z", code=2)
    spool.run("migration", "release", "move", "--at", "tomorrow", code=2)
    spool.run("migration", "release", "move", "--cancel")
    assert _show(spool)["release_at"] is None
    spool.run("migration", "release", "move", "--cancel", code=2)
    assert len(_audit(spool, "migration.schedule")) == 1
    assert len(_audit(spool, "migration.cancel")) == 1


def _send(node: Spooler, rcpts: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", node.port, timeout=10) as client:
        client.sendmail("sender@src.test", rcpts, b"Subject: move\r\n\r\nbody\r\n")


def test_serve_performs_scheduled_release_and_records_stages(spooler_factory: Any) -> None:
    target = Target().start()
    try:
        node: Spooler = spooler_factory()
        route = f"127.0.0.1:{target.port}"
        for name in DOMAINS:
            node.cli("domain", "add", name, "--route", route, "--tls", "off")
        node.cli("migration", "create", "move", *_args(*DOMAINS))
        node.start()

        # Relay mode: the first real mail makes the domain "relaying" (the serve sees it in
        # the counters; the intake writes nothing for it).
        _send(node, ["early@one.test"])
        wait_until(lambda: len(target.recorder.received) == 1, 20, "relayed mail delivered")
        wait_until(lambda: node.domain_status("one.test")["stage"] == "relaying", 20, "relaying")
        assert node.domain_status("two.test")["stage"] == "planned"

        node.cli("migration", "hold", "move")
        _send(node, [f"u@{name}" for name in DOMAINS])
        wait_until(lambda: node.domain_status("three.test")["held"] == 1, 10, "mail held")
        node.cli("migration", "release", "move", "--at", "+1s", "--rate", "600/min")
        wait_until(lambda: len(target.recorder.received) == 4, 30, "the scheduled release")
        show = json.loads(node.cli("migration", "show", "move", "--json").stdout)
        assert show["release_at"] is None
        assert {d["mode"] for d in show["domain_details"]} == {"relay"}
        releases = [
            e for e in json.loads(node.cli("audit", "--json").stdout)
            if e["action"] == "migration.release"
        ]  # fmt: skip
        assert len(releases) == 1 and releases[0]["actor"] == "schedule"
        events = {d["domain"]: [e["stage"] for e in d["events"]] for d in show["domain_details"]}
        assert events["one.test"] == ["planned", "relaying", "holding", "released"]
        assert events["two.test"] == ["planned", "holding", "released"]

        # A cancelled schedule is not performed (control: the one above was).
        node.cli("migration", "hold", "move")
        _send(node, ["late@two.test"])
        wait_until(lambda: node.domain_status("two.test")["held"] == 1, 10, "mail held")
        # (+8s: the cancel, a second CLI process, comes in time even on a loaded machine.)
        node.cli("migration", "release", "move", "--at", "+8s")
        scheduled = json.loads(node.cli("migration", "show", "move", "--json").stdout)
        assert scheduled["release_at"] is not None
        # Shown to the second; the schedule itself may be up to a second later.
        due = datetime.fromisoformat(scheduled["release_at"].replace("Z", "+00:00")).timestamp()
        node.cli("migration", "release", "move", "--cancel")
        assert time.time() < due, "too slow to tell: the schedule was due before the cancel"
        assert (
            json.loads(node.cli("migration", "show", "move", "--json").stdout)["release_at"] is None
        )
        stays(
            lambda: node.domain_status("two.test")["held"] == 1,
            due + 1 - time.time() + 2,
            "held after cancel",
        )
    finally:
        target.stop()
