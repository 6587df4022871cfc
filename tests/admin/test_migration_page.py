"""The migration pages of the dashboard in real headless Chromium (as tests/admin/test_browser.py).

Two domains of one migration in hold with mail waiting: the list shows the migration's totals;
its page shows every domain's stage and counts, the checklist grid (a manual step confirmed for
one domain only), the recorded events (a note with markup shown as text); "Release all" (a
confirmed, CSRF-protected POST to the migrations API) releases both and the page follows the
drain to the target. Screenshots go to the test's tmp dir and test-artifacts/ (docs/screenshots/
with MXSPOOL_UPDATE_SCREENSHOTS=1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.admin.conftest import TOKEN, AdminNode, message
from tests.admin.test_browser import browser, screenshot, wait_for
from tests.delivery.target import Target

__all__ = ["browser"]  # the fixture, imported for this module's tests

pytestmark = pytest.mark.slow

HELD = {"a.test": 3, "b.test": 2}


def test_migration_page(
    admin_node: AdminNode, target: Target, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    api = admin_node.client()
    for name in HELD:
        body = {"domain": name, "routes": [f"127.0.0.1:{target.port}"], "tls": "off"}
        assert api.post("/api/v1/domains", json=body).status_code == 201
    made = api.post(
        "/api/v1/migrations",
        json={
            "name": "move",
            "domains": list(HELD),
            "source_tenant": "contoso.onmicrosoft.com",
            "target_tenant": "fabrikam",
        },
    )
    assert made.status_code == 201, made.text
    assert api.post("/api/v1/migrations/move/hold", json={}).status_code == 200
    note = {"domain": "a.test", "step": "detached", "note": "<b>ticket</b> 42"}
    assert api.post("/api/v1/migrations/move/steps", json=note).status_code == 201
    number = 0
    for name, count in HELD.items():
        admin_node.wait_accepts(f"probe@{name}")
        for _ in range(count):
            number += 1
            rcpt = f"user{number}@{name}"
            admin_node.send("sender@src.test", [rcpt], message(number, rcpt))

    # Signed out: the pages send the browser to sign in, like every other page.
    anonymous = httpx.get(f"{admin_node.url}/migrations/move", follow_redirects=False)
    assert anonymous.status_code == 303 and "/login" in anonymous.headers["location"]

    driver = browser
    driver.get(f"{admin_node.url}/migrations")
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.ID, "sign-in").click()
    row = 'tr[data-migration="move"]'
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, row), what="the migrations list")
    wait_for(
        lambda: driver.find_element(By.CSS_SELECTOR, f"{row} .n.held").text == "5",
        what="5 held in the list",
    )
    assert "fabrikam" in driver.find_element(By.CSS_SELECTOR, row).text

    driver.find_element(By.CSS_SELECTOR, f"{row} a.migration-link").click()
    wait_for(lambda: driver.find_elements(By.ID, "migration-name"), what="the migration page")

    def cell(domain: str, css: str) -> str:
        found = driver.find_element(By.CSS_SELECTOR, f'tr.domain-row[data-domain="{domain}"] {css}')
        return str(found.text)

    for name, count in HELD.items():
        assert cell(name, ".stage") == "holding"
        assert cell(name, ".mode") == "hold"
        assert cell(name, ".n.held") == str(count)
    assert driver.find_element(By.CSS_SELECTOR, ".n.total-held").text == "5"

    def mark(domain: str, step: str) -> str:
        found = driver.find_element(
            By.CSS_SELECTOR, f'table.checkgrid .mark[data-domain="{domain}"][data-step="{step}"]'
        )
        return str(found.get_attribute("class"))

    assert "done" in mark("a.test", "hold") and "done" in mark("b.test", "hold")
    assert "done" in mark("a.test", "detached") and "todo" in mark("b.test", "detached")
    assert "todo" in mark("a.test", "release")
    events = driver.find_element(By.CSS_SELECTOR, "table.events")
    assert "<b>ticket</b> 42" in events.text  # markup in a note is shown, not rendered
    assert not events.find_elements(By.TAG_NAME, "b")
    assert "holding" in events.text and "planned" in events.text
    path = tmp_path / "migration-held.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 1000
    screenshot(driver, "migration-held.png")

    # Release all, paced, from the page: a confirmed JSON POST with the session's CSRF token.
    form = driver.find_element(By.ID, "migration-release")
    form.find_element(By.NAME, "rate").send_keys("600/min")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    alert = wait_for(lambda: driver.switch_to.alert, within=5, what="the confirmation")
    assert "a.test, b.test" in alert.text and "600/min" in alert.text
    alert.accept()

    wait_for(lambda: cell("a.test", ".stage") == "released", what="a.test released")
    wait_for(
        lambda: all(cell(name, ".n.delivered") == str(n) for name, n in HELD.items()),
        within=60,
        what="every held message delivered",
    )
    assert cell("b.test", ".n.held") == "0" and cell("b.test", ".mode") == "relay"
    assert len(target.recorder.received) == 5
    assert "done" in mark("a.test", "release") and "done" in mark("b.test", "release")
    assert not driver.find_elements(By.ID, "migration-release")  # nothing held any more
    screenshot(driver, "migration.png")

    entries = api.get("/api/v1/audit").json()["entries"]
    releases = [e for e in entries if e["action"] == "migration.release"]
    assert len(releases) == 1 and releases[0]["actor"] == "dashboard"
    assert "rate=600/min" in releases[0]["detail"]
    api.close()
