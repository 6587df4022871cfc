"""The admin HTTP API over real HTTP against a running node (SMTP, admin plane, delivery)."""

from __future__ import annotations

import csv
import io
import json
import smtplib
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.admin.conftest import TOKEN, AdminNode, message, wait_until
from tests.delivery.target import Target

DOMAIN = "example.test"

ENDPOINTS = [
    ("GET", "/api/v1/status"),
    ("GET", "/api/v1/domains"),
    ("POST", "/api/v1/domains"),
    ("GET", f"/api/v1/domains/{DOMAIN}"),
    ("PATCH", f"/api/v1/domains/{DOMAIN}"),
    ("DELETE", f"/api/v1/domains/{DOMAIN}"),
    ("POST", f"/api/v1/domains/{DOMAIN}/hold"),
    ("POST", f"/api/v1/domains/{DOMAIN}/release"),
    ("GET", "/api/v1/messages"),
    ("GET", "/api/v1/messages/X1"),
    ("GET", "/api/v1/messages/X1/raw"),
    ("POST", "/api/v1/messages/X1/retry"),
    ("POST", "/api/v1/messages/X1/discard"),
    ("POST", "/api/v1/parked/retry"),
    ("GET", "/api/v1/report"),
    ("GET", "/api/v1/audit"),
]


def metric_samples(node: AdminNode) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{node.url}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(node: AdminNode, name: str, **labels: str) -> float:
    return metric_samples(node).get((name, tuple(sorted(labels.items()))), 0.0)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"]
    return dict(body["error"])


def add_domain(api: httpx.Client, port: int, hold: bool = True) -> None:
    response = api.post(
        "/api/v1/domains",
        json={"domain": DOMAIN, "routes": [f"127.0.0.1:{port}"], "tls": "off", "hold": hold},
    )
    assert response.status_code == 201, response.text


# -- authentication and request hygiene ------------------------------------------------------


def test_every_endpoint_needs_the_token(admin_node: AdminNode) -> None:
    for token in (None, "wrong-token", TOKEN + "x", TOKEN[:-1]):
        with admin_node.client(token) as api:
            for method, path in ENDPOINTS:
                response = api.request(method, path, json={})
                assert response.status_code == 401, (token, method, path, response.text)
                assert response.headers["www-authenticate"].startswith("Bearer")
                assert error_of(response)["code"] == "unauthorized"
    with httpx.Client(base_url=admin_node.url) as raw:
        basic = raw.get("/api/v1/status", headers={"Authorization": f"Basic {TOKEN}"})
        assert basic.status_code == 401


def test_healthz_and_metrics_need_no_token_on_loopback(admin_node: AdminNode) -> None:
    with admin_node.client(None) as api:
        health = api.get("/healthz")
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}
        scraped = api.get("/metrics")
        assert scraped.status_code == 200
        assert scraped.headers["content-type"].startswith("text/plain")
        names = {family.name for family in text_string_to_metric_families(scraped.text)}
        assert {"mxspool_messages_accepted", "mxspool_smtp_sessions"} <= names


def test_writes_need_json_content_type(admin_node: AdminNode) -> None:
    with admin_node.client() as api:
        add_domain(api, 2526)
        for method, path in [
            ("POST", "/api/v1/domains"),
            ("POST", f"/api/v1/domains/{DOMAIN}/hold"),
            ("POST", f"/api/v1/domains/{DOMAIN}/release"),
            ("PATCH", f"/api/v1/domains/{DOMAIN}"),
            ("DELETE", f"/api/v1/domains/{DOMAIN}"),
            ("POST", "/api/v1/messages/X1/discard"),
        ]:
            for headers, content in [
                ({"Content-Type": "text/plain"}, b"{}"),
                ({"Content-Type": "application/x-www-form-urlencoded"}, b"rate=1%2Fs"),
                ({"Content-Type": "multipart/form-data; boundary=x"}, b"--x--"),
                ({}, b""),
            ]:
                response = api.request(method, path, headers=headers, content=content)
                assert response.status_code == 415, (method, path, headers, response.text)
                assert error_of(response)["code"] == "unsupported_media_type"
        # Nothing changed: the domain is still there and still held.
        assert api.get(f"/api/v1/domains/{DOMAIN}").json()["mode"] == "hold"
        charset = api.post(
            f"/api/v1/domains/{DOMAIN}/hold",
            headers={"Content-Type": "application/json; charset=utf-8"},
            content=b"{}",
        )
        assert charset.status_code == 200


def test_oversized_bodies_are_refused(admin_node: AdminNode) -> None:
    big = json.dumps({"domain": "big.test", "routes": ["a.test"] * 20000}).encode()
    assert len(big) > 64 * 1024
    with admin_node.client() as api:
        sized = api.post(
            "/api/v1/domains", content=big, headers={"Content-Type": "application/json"}
        )
        assert sized.status_code == 413
        assert error_of(sized)["code"] == "too_large"

        def chunks() -> Any:  # no Content-Length: chunked transfer encoding
            for start in range(0, len(big), 8192):
                yield big[start : start + 8192]

        chunked = api.post(
            "/api/v1/domains", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert chunked.status_code == 413
        assert api.get("/api/v1/domains/big.test").status_code == 404


def test_malformed_and_invalid_bodies(admin_node: AdminNode) -> None:
    with admin_node.client() as api:
        bad = api.post(
            "/api/v1/domains", content=b"{nope", headers={"Content-Type": "application/json"}
        )
        assert bad.status_code == 400
        assert error_of(bad)["code"] == "bad_json"
        array = api.post("/api/v1/domains", json=[1, 2])
        assert array.status_code == 400
        for body in [
            {"domain": "not a domain", "routes": ["mx.test"]},
            {"domain": "ok.test"},  # no route and no mx
            {"domain": "ok.test", "routes": ["mx.test"], "tls": "maybe"},
            {"domain": "ok.test", "routes": "mx.test", "colour": "blue"},
            {"domain": 5, "routes": ["mx.test"]},
        ]:
            response = api.post("/api/v1/domains", json=body)
            assert response.status_code == 422, (body, response.text)
            assert error_of(response)["code"] == "invalid"
        assert api.get("/api/v1/messages", params={"limit": "ten"}).status_code == 422
        assert api.get("/api/v1/messages", params={"limit": "0"}).status_code == 422
        assert api.get("/api/v1/messages", params={"state": "lost"}).status_code == 422
        assert api.get("/api/v1/report", params={"format": "xml"}).status_code == 422
        unknown = api.get("/api/v1/nothing/here")
        assert unknown.status_code == 404
        assert error_of(unknown)["code"] == "not_found"


def test_no_cors_headers(admin_node: AdminNode) -> None:
    with admin_node.client() as api:
        headers = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        for response in (
            api.options("/api/v1/status", headers=headers),
            api.get("/api/v1/status", headers={"Origin": "https://evil.example"}),
        ):
            assert not [h for h in response.headers if h.lower().startswith("access-control")]


# -- domains -------------------------------------------------------------------------------


def test_domain_endpoints(admin_node: AdminNode) -> None:
    with admin_node.client() as api:
        created = api.post(
            "/api/v1/domains",
            json={"domain": "Example.TEST", "routes": ["mx1.src.test:2526"], "hold": True},
        )
        assert created.status_code == 201
        assert created.json()["domain"] == DOMAIN
        assert created.json()["mode"] == "hold"
        assert created.json()["tls"] == "verify"
        again = api.post("/api/v1/domains", json={"domain": DOMAIN, "routes": ["mx.test"]})
        assert again.status_code == 409
        assert error_of(again)["code"] == "conflict"

        listed = api.get("/api/v1/domains").json()["domains"]
        assert [d["domain"] for d in listed] == [DOMAIN]
        shown = api.get(f"/api/v1/domains/{DOMAIN}").json()
        assert shown["routes"] == ["mx1.src.test:2526"]
        assert shown["status"]["held"] == 0
        assert api.get("/api/v1/domains/other.test").status_code == 404

        patched = api.patch(
            f"/api/v1/domains/{DOMAIN}",
            json={"routes": ["mx.target.test", "[2001:db8::1]:2525"], "tls": "require"},
        )
        assert patched.status_code == 200, patched.text
        assert patched.json()["routes"] == ["mx.target.test:25", "[2001:db8::1]:2525"]
        assert patched.json()["tls"] == "require"
        assert api.patch(f"/api/v1/domains/{DOMAIN}", json={}).status_code == 422
        assert api.patch(f"/api/v1/domains/{DOMAIN}", json={"mode": "x"}).status_code == 422
        assert api.patch("/api/v1/domains/other.test", json={"tls": "off"}).status_code == 404

        held = api.post(f"/api/v1/domains/{DOMAIN}/hold", json={})
        assert held.status_code == 200
        assert held.json()["mode"] == "hold"

        first = api.post(f"/api/v1/domains/{DOMAIN}/release", json={"rate": "600/min"})
        assert first.status_code == 200, first.text
        body = first.json()
        assert body["domain"]["mode"] == "relay"
        assert body["domain"]["rate_per_s"] == pytest.approx(10.0)
        assert body["canary"] is None
        released_at = body["domain"]["released_at"]
        assert released_at is not None
        # Idempotent: a second release changes nothing.
        second = api.post(f"/api/v1/domains/{DOMAIN}/release", json={})
        assert second.status_code == 200
        assert second.json()["domain"]["mode"] == "relay"
        assert second.json()["domain"]["released_at"] == released_at
        assert (
            api.post(f"/api/v1/domains/{DOMAIN}/release", json={"rate": "fast"}).status_code == 422
        )
        assert (
            api.post(f"/api/v1/domains/{DOMAIN}/release", json={"only": "a@b.test"}).status_code
            == 422
        )

        removed = api.request("DELETE", f"/api/v1/domains/{DOMAIN}", json={})
        assert removed.status_code == 200
        assert removed.json() == {"removed": DOMAIN}
        assert api.get(f"/api/v1/domains/{DOMAIN}").status_code == 404
        gone = api.request("DELETE", f"/api/v1/domains/{DOMAIN}", json={})
        assert gone.status_code == 404

        entries = api.get("/api/v1/audit").json()["entries"]
        actions = [(e["actor"], e["action"], e["target"]) for e in entries]
        assert actions[0] == ("api", "domain.remove", DOMAIN)
        assert ("api", "domain.add", DOMAIN) in actions
        assert ("api", "domain.route", DOMAIN) in actions
        assert actions.count(("api", "domain.release", DOMAIN)) == 2
        limited = api.get("/api/v1/audit", params={"limit": 2}).json()["entries"]
        assert len(limited) == 2


# -- messages, report, metrics ---------------------------------------------------------------


def test_messages_report_and_metrics(admin_node: AdminNode, target: Target) -> None:
    api = admin_node.client()
    add_domain(api, target.port)
    admin_node.wait_accepts(f"probe@{DOMAIN}")
    sent: dict[str, bytes] = {}
    for number in range(5):
        rcpt = f"user{number}@{DOMAIN}"
        data = message(number, rcpt)
        sent[admin_node.send(f"sender{number}@src.test", [rcpt], data)] = data
    # wait_accepts may have been refused while the intake had not yet seen the domain.
    denied_before = metric(admin_node, "mxspool_smtp_rejected_total", reason="relay_denied")
    with smtplib.SMTP("127.0.0.1", admin_node.port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("x@src.test")
        assert smtp.rcpt("someone@elsewhere.test")[0] == 550

    # Pagination by cursor: 5 rows in pages of 2.
    seen: list[str] = []
    cursor: int | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2, "domain": DOMAIN}
        if cursor is not None:
            params["cursor"] = cursor
        page = api.get("/api/v1/messages", params=params).json()
        pages += 1
        seen += [row["id"] for row in page["messages"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(sent)  # oldest first, each once

    held = api.get("/api/v1/messages", params={"state": "held"}).json()["messages"]
    assert len(held) == 5
    assert {row["state"] for row in held} == {"held"}
    assert api.get("/api/v1/messages", params={"state": "delivered"}).json()["messages"] == []
    by_rcpt = api.get("/api/v1/messages", params={"q": f"user3@{DOMAIN}"}).json()["messages"]
    assert [row["rcpt"] for row in by_rcpt] == [f"user3@{DOMAIN}"]
    by_sender = api.get("/api/v1/messages", params={"q": "sender2@"}).json()["messages"]
    assert [row["mail_from"] for row in by_sender] == ["sender2@src.test"]
    by_message_id = api.get("/api/v1/messages", params={"q": "m4.admin@src.test"}).json()
    assert [row["rcpt"] for row in by_message_id["messages"]] == [f"user4@{DOMAIN}"]

    first_id, first_data = next(iter(sent.items()))
    detail = api.get(f"/api/v1/messages/{first_id}").json()
    assert detail["id"] == first_id
    assert detail["message_id"] == "<m0.admin@src.test>"
    assert detail["mail_from"] == "sender0@src.test"
    assert detail["recipients"][0]["state"] == "held"
    raw = api.get(f"/api/v1/messages/{first_id}/raw")
    assert raw.status_code == 200
    assert raw.headers["content-type"] == "message/rfc822"
    assert raw.content.startswith(b"Received: ")
    assert raw.content.endswith(first_data)
    for suffix in ("", "/raw"):
        missing = api.get(f"/api/v1/messages/NOSUCHID{suffix}")
        assert missing.status_code == 404
        assert error_of(missing)["code"] == "not_found"
    assert api.post("/api/v1/messages/NOSUCHID/discard", json={}).status_code == 404

    # Discard one, retry one with nothing parked.
    last_id = list(sent)[-1]
    discarded = api.post(f"/api/v1/messages/{last_id}/discard", json={})
    assert discarded.status_code == 200
    assert discarded.json() == {"id": last_id, "discarded": 1}
    assert api.post(f"/api/v1/messages/{last_id}/retry", json={}).json()["retried"] == 0

    samples = metric_samples(admin_node)
    assert samples[("mxspool_domain_held", (("domain", DOMAIN),))] == 4
    assert samples[("mxspool_domain_hold", (("domain", DOMAIN),))] == 1
    assert samples[("mxspool_domain_oldest_pending_age_seconds", (("domain", DOMAIN),))] >= 0
    assert metric(admin_node, "mxspool_messages_accepted_total", domain=DOMAIN) == 5
    denied = metric(admin_node, "mxspool_smtp_rejected_total", reason="relay_denied")
    assert denied - denied_before == 1
    assert metric(admin_node, "mxspool_commit_seconds_count") == 5
    wait_until(lambda: metric(admin_node, "mxspool_smtp_sessions") == 0, what="0 sessions")
    with smtplib.SMTP("127.0.0.1", admin_node.port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        assert metric(admin_node, "mxspool_smtp_sessions") == 1

    # Release: the delivery engine drains the held mail to the target.
    released = api.post(f"/api/v1/domains/{DOMAIN}/release", json={})
    assert released.status_code == 200
    wait_until(
        lambda: api.get("/api/v1/status").json()["totals"]["delivered"] == 4,
        within=30,
        what="4 deliveries",
    )
    assert len(target.recorder.received) == 4
    status = api.get("/api/v1/status").json()
    row = status["domains"][0]
    assert (row["held"], row["pending"], row["delivered"], row["discarded"]) == (0, 0, 4, 1)
    assert metric(admin_node, "mxspool_recipients_delivered_total", domain=DOMAIN) == 4
    assert metric(admin_node, "mxspool_delivery_seconds_count", domain=DOMAIN) >= 1
    assert metric(admin_node, "mxspool_domain_held", domain=DOMAIN) == 0
    assert metric(admin_node, "mxspool_domain_hold", domain=DOMAIN) == 0

    report = api.get("/api/v1/report", params={"domain": DOMAIN})
    assert report.status_code == 200
    rows = report.json()
    assert sorted(r["id"] for r in rows) == sorted(sent)
    assert {r["state"] for r in rows} == {"delivered", "discarded"}
    delivered_row = next(r for r in rows if r["id"] == first_id)
    assert delivered_row["remote_reply"].startswith("250")
    as_csv = api.get("/api/v1/report", params={"format": "csv"})
    assert as_csv.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert len(table) == 5
    assert list(table[0]) == [
        "id",
        "message_id",
        "mail_from",
        "rcpt",
        "size",
        "sha256",
        "received_at",
        "state",
        "attempts",
        "delivered_at",
        "remote_reply",
        "sent_sha256",
        "spf",
        "dkim",
        "dmarc",
        "purged",
    ]
    assert api.get("/api/v1/report", params={"domain": "none.test"}).json() == []
    api.close()


def test_parked_mail_retry(admin_node: AdminNode, target: Target) -> None:
    api = admin_node.client()
    add_domain(api, target.port, hold=False)
    admin_node.wait_accepts(f"probe@{DOMAIN}")
    target.behaviour.rcpt_replies[f"nobody@{DOMAIN}"] = "550 5.1.1 No such user"
    queue_id = admin_node.send("s@src.test", [f"nobody@{DOMAIN}"], message(1, "nobody"))
    wait_until(
        lambda: api.get("/api/v1/status").json()["totals"]["parked"] == 1,
        within=30,
        what="the recipient to be parked",
    )
    parked = api.get("/api/v1/messages", params={"state": "parked"}).json()["messages"]
    assert [row["id"] for row in parked] == [queue_id]
    assert parked[0]["last_reply"].startswith("550")
    detail = api.get(f"/api/v1/messages/{queue_id}").json()
    assert detail["attempts"][0]["reply"].startswith("550")
    assert metric(admin_node, "mxspool_domain_parked", domain=DOMAIN) == 1
    assert metric(admin_node, "mxspool_recipients_parked_total", domain=DOMAIN) == 1

    del target.behaviour.rcpt_replies[f"nobody@{DOMAIN}"]
    retried = api.post(f"/api/v1/messages/{queue_id}/retry", json={})
    assert retried.json() == {"id": queue_id, "retried": 1}
    wait_until(
        lambda: api.get("/api/v1/status").json()["totals"]["delivered"] == 1,
        within=30,
        what="the retried recipient to be delivered",
    )
    assert api.post("/api/v1/parked/retry", json={"domain": DOMAIN}).json() == {"retried": 0}
    audit = api.get("/api/v1/audit").json()["entries"]
    assert audit[0]["action"] == "queue.retry"
    assert audit[1] == {**audit[1], "actor": "api", "action": "queue.retry", "target": queue_id}
    api.close()
