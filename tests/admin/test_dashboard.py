"""The dashboard over real HTTP: sign-in, session cookie, CSRF, pages, escaping."""

from __future__ import annotations

import contextlib
import re

import httpx

from tests.admin.conftest import TOKEN, AdminNode

DOMAIN = "example.test"


def sign_in(node: AdminNode) -> tuple[httpx.Client, str]:
    """A client holding a dashboard session; and the page's CSRF token."""
    client = httpx.Client(base_url=node.url, timeout=10)
    response = client.post("/login", data={"token": TOKEN, "next": "/"})
    assert response.status_code == 303
    assert response.headers["location"] == "/"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    home = client.get("/")
    assert home.status_code == 200
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', home.text)
    assert match is not None
    return client, match.group(1)


def test_sign_in_and_session(admin_node: AdminNode) -> None:
    with httpx.Client(base_url=admin_node.url, timeout=10) as anonymous:
        home = anonymous.get("/messages?q=a")
        assert home.status_code == 303
        assert home.headers["location"] == "/login?next=/messages%3Fq%3Da"
        assert anonymous.get("/login").status_code == 200
        wrong = anonymous.post("/login", data={"token": "nope"})
        assert wrong.status_code == 401
        assert "not valid" in wrong.text
        cross_site = anonymous.post(
            "/login", data={"token": TOKEN}, headers={"Origin": "https://evil.example"}
        )
        assert cross_site.status_code == 403
        assert "set-cookie" not in cross_site.headers
        off_site = anonymous.post("/login", data={"token": TOKEN, "next": "//evil.example/"})
        assert off_site.headers["location"] == "/"
    client, csrf = sign_in(admin_node)
    with contextlib.closing(client):
        page = client.get("/")
        assert "Content-Security-Policy" in page.headers
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert 'src="/static/app.js"' in page.text
        assert "http://" not in page.text and "https://" not in page.text  # no other hosts
        script = client.get("/static/app.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        assert client.get("/static/app.css").status_code == 200
        partial = client.get("/", headers={"X-Partial": "1"})
        assert "<html" not in partial.text
        assert "<h1>Overview</h1>" in partial.text

        signed_out = client.post("/logout", data={"csrf": csrf})
        assert signed_out.status_code == 303
        assert client.get("/").status_code == 303


def test_dashboard_actions_need_the_csrf_token(admin_node: AdminNode) -> None:
    with admin_node.client() as api:
        api.post("/api/v1/domains", json={"domain": DOMAIN, "routes": ["mx.test"], "hold": True})
    client, csrf = sign_in(admin_node)
    with contextlib.closing(client):
        assert client.get("/api/v1/status").status_code == 200  # reads need no CSRF token
        release = f"/api/v1/domains/{DOMAIN}/release"
        no_token = client.post(release, json={})
        assert no_token.status_code == 403
        assert no_token.json()["error"]["code"] == "csrf"
        wrong = client.post(release, json={}, headers={"X-CSRF-Token": csrf + "x"})
        assert wrong.status_code == 403
        as_form = client.post(
            release, data={"only": "a@example.test"}, headers={"X-CSRF-Token": csrf}
        )
        assert as_form.status_code == 415
        ok = client.post(release, json={}, headers={"X-CSRF-Token": csrf})
        assert ok.status_code == 200
        assert ok.json()["domain"]["mode"] == "relay"
        entry = client.get("/api/v1/audit").json()["entries"][0]
        assert (entry["actor"], entry["action"], entry["target"]) == (
            "dashboard",
            "domain.release",
            DOMAIN,
        )


def test_pages_render_and_escape(admin_node: AdminNode) -> None:
    with admin_node.client() as api:
        api.post(
            "/api/v1/domains",
            json={"domain": DOMAIN, "routes": ["127.0.0.1:9"], "tls": "off", "hold": True},
        )
    admin_node.wait_accepts(f"probe@{DOMAIN}")
    evil = b"Subject: <script>alert(1)</script>\r\nMessage-ID: <x@src.test>\r\n\r\nbody\r\n"
    queue_id = admin_node.send("sender@src.test", [f"user@{DOMAIN}"], evil)
    client, _csrf = sign_in(admin_node)
    with contextlib.closing(client):
        overview = client.get("/").text
        assert f'data-domain="{DOMAIN}"' in overview
        assert '<span class="n held">1</span>' in overview
        assert "<svg" in overview
        domain = client.get(f"/domains/{DOMAIN}").text
        assert "Migration checklist" in domain
        assert 'data-step="hold"' in domain
        assert re.search(r'class="step done" data-step="hold"', domain)
        assert re.search(r'class="step todo" data-step="release"', domain)
        assert client.get("/domains/none.test").status_code == 404
        messages = client.get("/messages", params={"q": "sender@src"}).text
        assert queue_id in messages
        page = client.get(f"/messages/{queue_id}")
        assert page.status_code == 200
        assert "<script>alert(1)</script>" not in page.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
        assert f"/api/v1/messages/{queue_id}/raw" in page.text
        raw = client.get(f"/api/v1/messages/{queue_id}/raw")  # the session cookie is enough
        assert raw.content.endswith(evil)
        assert client.get("/messages/NOSUCH").status_code == 404
        assert client.get("/parked").status_code == 200
        audit = client.get("/audit").text
        assert "domain.add" in audit
