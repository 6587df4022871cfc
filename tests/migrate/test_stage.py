"""The migration stage and the dashboard's checklist advance as commands run and DNS changes."""

from __future__ import annotations

import json

from mxspool.admin.checklist import checklist
from mxspool.stage import stage
from mxspool.store.base import AuditEntry, Domain, DomainMode, DomainStatus, Route
from tests.migrate.conftest import SPOOLER, Cli

NAME = "notyet.test"  # MX 10 mx.source.test in the test zone


def _stage(mxcli: Cli) -> str:
    rows = json.loads(mxcli("status", "--json").stdout)["domains"]
    row = next(row for row in rows if row["domain"] == NAME)
    # status --json keeps its keys and adds the stage.
    assert {"domain", "mode", "held", "pending", "delivered", "oldest_pending_age_s"} <= set(row)
    return str(row["stage"])


def test_stage_follows_the_operator_story(mxcli: Cli) -> None:
    mxcli("domain", "add", NAME, "--route", "mx.target.test", "--tls", "off")
    assert _stage(mxcli) == "planned"
    # MX still at the source (neither the spooler nor the route): the stage stays.
    mxcli("check", "dns", NAME, "--spooler", SPOOLER)
    assert _stage(mxcli) == "planned"
    # Pretend the spooler is mx.source.test: check dns now sees MX at the spooler.
    mxcli("check", "dns", NAME, "--spooler", "mx.source.test")
    assert _stage(mxcli) == "mx-to-spooler"
    mxcli("domain", "hold", NAME)
    assert _stage(mxcli) == "holding"
    mxcli("domain", "release", NAME)
    assert _stage(mxcli) == "released"
    # The route now is where MX points: after the release that is "MX at the target".
    mxcli("domain", "route", NAME, "--route", "mx.source.test")
    mxcli("check", "dns", NAME, "--spooler", SPOOLER)
    assert _stage(mxcli) == "done"  # nothing left open
    assert "Stage" in mxcli("status").output and "done" in mxcli("status").output


def _status(**counts: int) -> DomainStatus:
    return DomainStatus(domain=NAME, mode=DomainMode.RELAY, **counts)


def _entry(at: float, action: str, detail: str = "") -> AuditEntry:
    return AuditEntry(at, "cli", action, NAME, detail)


def test_stage_rules() -> None:
    relay = Domain(NAME, DomainMode.RELAY, (Route("mx.target.test"),), created_at=1.0)
    held = Domain(NAME, DomainMode.HOLD, (Route("mx.target.test"),), created_at=1.0)
    assert stage(relay, _status(), []) == "planned"
    # A probe alone is not mail coming through MX.
    assert stage(relay, _status(delivered=1), [_entry(2, "probe")]) == "planned"
    assert stage(relay, _status(delivered=3), [_entry(2, "probe")]) == "relaying"
    assert stage(held, _status(held=3), [_entry(2, "domain.hold")]) == "holding"
    release = _entry(3, "domain.release", "was=hold")
    assert stage(relay, _status(pending=3), [release]) == "released"
    # MX seen at the route before the release does not count; after it, it does.
    early = _entry(2, "check.dns", "mx=route spooler=x verdict=go")
    late = _entry(4, "check.dns", "mx=route spooler=x verdict=go")
    assert stage(relay, _status(pending=3), [early, release]) == "released"
    assert stage(relay, _status(pending=3), [release, late]) == "mx-to-target"
    assert stage(relay, _status(delivered=3), [release, late]) == "done"
    # Other domains' entries are ignored.
    other = AuditEntry(5, "cli", "check.dns", "other.test", "mx=spooler")
    assert stage(relay, _status(), [other]) == "planned"


def test_checklist_shows_stage_plan_and_mx_steps() -> None:
    domain = Domain(NAME, DomainMode.RELAY, (Route("mx.target.test"),), released_at=3.0)
    audit = [
        _entry(1, "runbook", "spooler=s ip=203.0.113.7 target=-"),
        _entry(1.5, "domain.add", "mode=relay"),
        _entry(1.6, "check.dns", "mx=spooler spooler=s verdict=go"),
        _entry(2, "domain.hold", "was=relay"),
        _entry(3, "domain.release", "was=hold"),
        _entry(4, "check.dns", "mx=route spooler=s verdict=go"),
    ]
    steps = {step.key: step for step in checklist(domain, _status(delivered=2), audit)}
    assert steps["stage"].title.startswith("Stage: done")
    assert steps["plan"].done is True and "203.0.113.7" in steps["plan"].detail
    assert steps["cutover"].done is True and "check dns" in steps["cutover"].detail
    assert steps["mx-target"].done is True
    assert steps["finish"].done is True
    fresh = {s.key: s for s in checklist(domain, _status(pending=1), audit[:5])}
    assert fresh["mx-target"].done is False and fresh["stage"].title.startswith("Stage: released")
