"""/api/v1/migrations over real HTTP against a running node: the CLI's migration commands,
with the same auth, error envelope and audit (once per action, naming the token)."""

from __future__ import annotations

import csv
import io
from typing import Any

from tests.admin.conftest import AdminNode, message, wait_until
from tests.delivery.target import Target

DOMAINS = ("a.test", "b.test", "c.test")


def _audit(client: Any, action: str) -> list[dict[str, Any]]:
    entries = client.get("/api/v1/audit", params={"limit": 500}).json()["entries"]
    return [entry for entry in entries if entry["action"] == action]


def test_migration_api_mirrors_the_cli(admin_node: AdminNode, target: Target) -> None:
    api = admin_node.client()
    route = f"127.0.0.1:{target.port}"
    for name in DOMAINS:
        made = api.post("/api/v1/domains", json={"domain": name, "routes": [route], "tls": "off"})
        assert made.status_code == 201, made.text
    assert admin_node.client(token=None).get("/api/v1/migrations").status_code == 401

    body = {"name": "move", "domains": ["a.test", "b.test"], "target_tenant": "fabrikam"}
    created = api.post("/api/v1/migrations", json=body)
    assert created.status_code == 201, created.text
    assert created.json()["domains"] == ["a.test", "b.test"]
    # Hardening: unknown fields, bad names, taken domains, unknown migrations.
    bad = api.post("/api/v1/migrations", json={**body, "name": "x", "colour": "red"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid"
    assert api.post("/api/v1/migrations", json={**body, "name": "bad name"}).status_code == 422
    taken = api.post("/api/v1/migrations", json={**body, "name": "other"})
    assert taken.status_code == 409 and "already belongs" in taken.json()["error"]["message"]
    assert api.get("/api/v1/migrations/nope").status_code == 404
    assert api.post("/api/v1/migrations/move/hold", json={"x": 1}).status_code == 422

    added = api.post("/api/v1/migrations/move/domains", json={"domains": ["c.test"]})
    assert added.status_code == 200 and added.json()["domains"] == list(DOMAINS)

    assert api.post("/api/v1/migrations/move/hold", json={}).status_code == 200
    assert {d["mode"] for d in api.get("/api/v1/domains").json()["domains"]} == {"hold"}
    holds = _audit(api, "migration.hold")
    assert (
        len(holds) == 1
        and holds[0]["actor"] != "cli"
        and "a.test,b.test,c.test" in (holds[0]["detail"])
    )
    for number, name in enumerate(DOMAINS):
        admin_node.wait_accepts(f"u@{name}")
        admin_node.send("sender@src.test", [f"u@{name}"], message(number, f"u@{name}"))
    wait_until(lambda: api.get("/api/v1/migrations/move").json()["totals"]["held"] == 3, 10, "held")

    rerouted = api.post("/api/v1/migrations/move/route", json={"tls": "off", "routes": [route]})
    assert rerouted.status_code == 200, rerouted.text
    assert api.post("/api/v1/migrations/move/route", json={}).status_code == 422
    assert api.post("/api/v1/migrations/move/release", json={"rate": "fast"}).status_code == 422
    step = api.post("/api/v1/migrations/move/steps", json={"domain": "a.test", "step": "detached"})
    assert step.status_code == 201 and step.json()["stage"] == "detached"

    released = api.post("/api/v1/migrations/move/release", json={"rate": "600/min"})
    assert released.status_code == 200, released.text
    assert released.json()["rate_per_s"] == 10.0
    wait_until(lambda: len(target.recorder.received) == 3, 20, "delivered")
    assert len(_audit(api, "migration.release")) == 1

    shown = api.get("/api/v1/migrations/move").json()
    stages = {d["domain"]: [e["stage"] for e in d["events"]] for d in shown["domain_details"]}
    assert stages["a.test"] == ["planned", "holding", "detached", "released"]
    report = api.get("/api/v1/migrations/move/report", params={"format": "csv"})
    rows = list(csv.DictReader(io.StringIO(report.text)))
    assert sorted(row["domain"] for row in rows) == list(DOMAINS)
    wait_until(
        lambda: (
            {r["state"] for r in api.get("/api/v1/migrations/move/report").json()} == {"delivered"}
        ),
        10,
        "the ledger final",
    )

    scheduled = api.post("/api/v1/migrations/move/release", json={"at": "+1h"})
    assert scheduled.status_code == 200 and scheduled.json()["scheduled_at"]
    assert api.post("/api/v1/migrations/move/release", json={"cancel": True}).status_code == 200

    gone = api.request("DELETE", "/api/v1/migrations/move/domains", json={"domains": ["c.test"]})
    assert gone.status_code == 200 and gone.json()["domains"] == ["a.test", "b.test"]
    assert api.request("DELETE", "/api/v1/migrations/move", json={}).status_code == 200
    assert api.get("/api/v1/migrations").json()["migrations"] == []
