"""The migration stage and the dashboard's checklist advance as commands run and DNS changes."""

from __future__ import annotations

import json

from mxspool.admin.checklist import checklist
from mxspool.stage import after_dns_check, from_counters, stage
from mxspool.store.base import AuditEntry, Domain, DomainMode, DomainStatus, Route, StageEvent
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


def _event(at: float, stage_name: str, domain: str = NAME) -> StageEvent:
    return StageEvent(domain, stage_name, at, "cli")


def _entry(at: float, action: str, detail: str = "") -> AuditEntry:
    return AuditEntry(at, "cli", action, NAME, detail)


def test_stage_rules() -> None:
    relay = Domain(NAME, DomainMode.RELAY, (Route("mx.target.test"),), created_at=1.0)
    held = Domain(NAME, DomainMode.HOLD, (Route("mx.target.test"),), created_at=1.0)
    # No events (a domain configured before stages were recorded): its mode says.
    assert stage(relay, _status(), []) == "planned"
    assert stage(held, _status(held=3), []) == "holding"
    assert stage(relay, _status(), [_event(1, "planned")]) == "planned"
    # The last event is the stage: held again after a release shows holding.
    story = [_event(1, "planned"), _event(2, "holding"), _event(3, "released")]
    assert stage(relay, _status(pending=3), story) == "released"
    assert stage(held, _status(held=3), [*story, _event(4, "holding")]) == "holding"
    # After MX moved to the target, done once nothing is left, and back if mail comes.
    moved = [*story, _event(4, "mx-to-target")]
    assert stage(relay, _status(pending=3), moved) == "mx-to-target"
    assert stage(relay, _status(delivered=3), moved) == "done"
    assert stage(relay, _status(pending=1), [*moved, _event(5, "done")]) == "mx-to-target"
    # Manual steps and other domains' events do not move the stage.
    assert stage(relay, _status(), [_event(1, "planned"), _event(2, "detached")]) == "planned"
    assert stage(relay, _status(), [_event(5, "holding", "other.test")]) == "planned"


def test_events_from_dns_checks_and_counters() -> None:
    relay = Domain(NAME, DomainMode.RELAY, (Route("mx.target.test"),))
    held = Domain(NAME, DomainMode.HOLD, (Route("mx.target.test"),))
    assert after_dns_check("planned", "spooler", _status()) == ["mx-to-spooler"]
    assert after_dns_check("holding", "spooler", _status()) == []  # never backwards
    assert after_dns_check("planned", "route", _status()) == []  # MX at the route before
    assert after_dns_check("released", "route", _status(pending=1)) == ["mx-to-target"]
    assert after_dns_check("released", "route", _status()) == ["mx-to-target", "done"]
    # A probe alone is not mail coming through MX.
    assert from_counters("mx-to-spooler", relay, _status(delivered=1), probes=1) is None
    assert from_counters("mx-to-spooler", relay, _status(delivered=3), probes=1) == "relaying"
    assert from_counters("planned", held, _status(held=3), probes=0) is None
    assert from_counters("mx-to-target", relay, _status(delivered=3), probes=0) == "done"
    assert from_counters("mx-to-target", relay, _status(pending=1), probes=0) is None


def test_checklist_shows_stage_plan_and_mx_steps() -> None:
    domain = Domain(NAME, DomainMode.RELAY, (Route("mx.target.test"),), released_at=3.0)
    audit = [
        _entry(1, "runbook", "spooler=s ip=203.0.113.7 target=-"),
        _entry(1.5, "domain.add", "mode=relay"),
        _entry(1.6, "check.dns", "mx=spooler spooler=s verdict=go"),
    ]
    events = [
        _event(1.5, "planned"),
        _event(1.6, "mx-to-spooler"),
        _event(2, "holding"),
        StageEvent(NAME, "detached", 2.5, "alice", "removed from contoso"),
        _event(3, "released"),
        _event(4, "mx-to-target"),
    ]
    steps = {s.key: s for s in checklist(domain, _status(delivered=2), audit, events)}
    assert steps["stage"].title.startswith("Stage: done")
    assert steps["plan"].done is True and "203.0.113.7" in steps["plan"].detail
    assert steps["cutover"].done is True and "check dns" in steps["cutover"].detail
    assert steps["detached"].done is True and "alice" in steps["detached"].detail
    assert "removed from contoso" in steps["detached"].detail
    assert steps["attached"].done is False
    assert steps["mx-target"].done is True
    assert steps["finish"].done is True
    fresh = {s.key: s for s in checklist(domain, _status(pending=1), audit, events[:5])}
    assert fresh["mx-target"].done is False and fresh["stage"].title.startswith("Stage: released")
