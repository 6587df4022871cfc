"""``GET /api/v1/migrations/{name}/runbook`` and ``POST .../release`` with ``dry_run`` over
real HTTP against a running node (with the test DNS server as its resolver): the same runbook
and release plan as the CLI's, for every domain of the migration."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.admin.conftest import AdminNode, message, wait_until
from tests.delivery.dnsserver import DnsServer

ZONE = """
a.test. 300 IN MX 10 mx.source.test.
b.test. 3600 IN MX 10 mx.source.test.
"""


@pytest.fixture
def node(tmp_path: Path) -> Iterator[AdminNode]:
    dns = DnsServer(ZONE).start()
    (tmp_path / "node").mkdir()
    node = AdminNode(tmp_path / "node", delivery={"resolver": dns.address})
    node.start()
    yield node
    node.stop()
    dns.stop()


def test_runbook_and_dry_run(node: AdminNode) -> None:
    api = node.client()
    for name in ("a.test", "b.test"):
        body = {"domain": name, "routes": ["127.0.0.1:9"], "tls": "off", "hold": True}
        assert api.post("/api/v1/domains", json=body).status_code == 201
    body = {
        "name": "move",
        "domains": ["a.test", "b.test"],
        "source_tenant": "contoso-a",
        "target_tenant": "fabrikam.onmicrosoft.com",
    }
    assert api.post("/api/v1/migrations", json=body).status_code == 201

    query = {"spooler_host": "spool.example.net", "spooler_ip": "203.0.113.7"}
    got = api.get("/api/v1/migrations/move/runbook", params=query)
    assert got.status_code == 200, got.text
    assert got.headers["content-type"].startswith("text/markdown")
    text = got.text
    assert "Tenant-to-tenant runbook for migration move (a.test, b.test)" in text
    assert "SOURCE tenant (contoso-a)" in text
    assert "TARGET tenant (fabrikam.onmicrosoft.com)" in text
    assert "b.test: MX mx.source.test, TTL 3600 s" in text  # from the node's resolver
    ps1 = api.get("/api/v1/migrations/move/runbook", params={**query, "format": "ps1"})
    assert ps1.status_code == 200 and "[string]$Step" in ps1.text
    assert ps1.headers["content-type"].startswith("text/plain")
    runbooks = [
        e for e in api.get("/api/v1/audit").json()["entries"] if e["action"] == "runbook"
    ]  # fmt: skip
    assert len(runbooks) == 4 and {e["actor"] for e in runbooks} != {"cli"}
    # Refusals: missing or bad parameters, unknown migration, no token.
    missing = api.get("/api/v1/migrations/move/runbook", params={"spooler_host": "x.example"})
    assert missing.status_code == 422 and "spooler_ip" in missing.json()["error"]["message"]
    bad = api.get("/api/v1/migrations/move/runbook", params={**query, "format": "pdf"})
    assert bad.status_code == 422
    assert api.get("/api/v1/migrations/nope/runbook", params=query).status_code == 404
    unsigned = node.client(token=None).get("/api/v1/migrations/move/runbook", params=query)
    assert unsigned.status_code == 401

    for number, rcpt in enumerate(("u@a.test", "u@a.test", "v@b.test")):
        node.wait_accepts(rcpt)
        node.send("sender@src.test", [rcpt], message(number, rcpt))
    wait_until(lambda: api.get("/api/v1/migrations/move").json()["totals"]["held"] == 3, 10)

    planned = api.post("/api/v1/migrations/move/release", json={"dry_run": True, "rate": "60/min"})
    assert planned.status_code == 200, planned.text
    plan = planned.json()
    assert plan["messages"] == 3 and plan["shared_rate"] is True
    rows = {r["address"]: r for d in plan["domains"] for r in d["recipients"]}
    assert rows["u@a.test"]["messages"] == 2 and rows["v@b.test"]["messages"] == 1
    assert plan["eta_s"] == pytest.approx(3.0, abs=0.2)  # 3 messages at the shared 1/s
    # Nothing changed: still held, no release audited.
    assert {d["mode"] for d in api.get("/api/v1/domains").json()["domains"]} == {"hold"}
    entries = api.get("/api/v1/audit").json()["entries"]
    assert not [e for e in entries if e["action"] == "migration.release"]
    both = api.post("/api/v1/migrations/move/release", json={"dry_run": True, "at": "+1h"})
    assert both.status_code == 422
    assert (
        api.post("/api/v1/migrations/move/release", json={"dry_run": True, "rate": "x"})
    ).status_code == 422
    # Control: the same endpoint without dry_run releases.
    assert api.post("/api/v1/migrations/move/release", json={}).status_code == 200
    assert {d["mode"] for d in api.get("/api/v1/domains").json()["domains"]} == {"relay"}
