"""The dashboard in real headless Chromium (Debian's chromium + chromium-driver, no downloads).

Sign in, see a held domain with its count, press release, watch the count reach zero as the
delivery engine drains it to a real SMTP target, open a delivered message. Screenshots go to
test-artifacts/; with MXSPOOL_UPDATE_SCREENSHOTS=1 also to docs/screenshots/ (for the README),
so an ordinary test run leaves the work tree clean.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.admin.conftest import TOKEN, AdminNode, message
from tests.delivery.target import Target

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
SCREENSHOTS = ROOT / "docs" / "screenshots"
DOMAIN = "example.test"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
)

pytestmark = pytest.mark.slow


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("MXSPOOL_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed (apt-get install chromium)")
        pytest.skip("chromium and chromium-driver are not installed")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(condition: Callable[[], Any], within: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + within
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the page may be mid-refresh; try again
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last error: {last!r}")


def screenshot(driver: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    if os.environ.get("MXSPOOL_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOTS / name)


def test_release_from_the_dashboard(admin_node: AdminNode, target: Target, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    api = httpx.Client(
        base_url=admin_node.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    created = api.post(
        "/api/v1/domains",
        json={"domain": DOMAIN, "routes": [f"127.0.0.1:{target.port}"], "tls": "off", "hold": True},
    )
    assert created.status_code == 201
    api.post("/api/v1/domains", json={"domain": "example.org", "routes": ["mx.example.org"]})
    admin_node.wait_accepts(f"probe@{DOMAIN}")
    for number in range(12):
        admin_node.send(
            f"sender{number}@src.test",
            [f"user{number}@{DOMAIN}"],
            message(number, f"user{number}@{DOMAIN}"),
        )

    driver = browser
    driver.get(f"{admin_node.url}/")
    assert "/login" in driver.current_url
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.ID, "sign-in").click()
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "tr.domain-row"), what="overview")

    def count(state: str) -> str:
        cell = driver.find_element(By.CSS_SELECTOR, f'tr[data-domain="{DOMAIN}"] .n.{state}')
        return str(cell.text)

    def charted(chart: str) -> bool:
        """Whether the chart shows the 12 recipients (the sampler looks every 5 s)."""
        driver.refresh()
        caption = driver.find_element(By.CSS_SELECTOR, f"figure.chart.{chart} figcaption")
        return "12 in the last hour" in caption.text

    wait_for(lambda: charted("accepted"), what="the accepted mail on the chart")

    assert count("held") == "12"
    assert "hold" in driver.find_element(By.CSS_SELECTOR, f'tr[data-domain="{DOMAIN}"] .mode').text
    screenshot(driver, "overview-held.png")

    driver.find_element(By.ID, f"release-{DOMAIN}").click()
    alert = wait_for(lambda: driver.switch_to.alert, within=5, what="the confirmation")
    assert DOMAIN in alert.text
    alert.accept()

    # The page refreshes itself; the held count drains to zero as the engine delivers.
    wait_for(lambda: count("held") == "0", what="held count to reach 0")
    wait_for(lambda: count("delivered") == "12", within=60, what="12 deliveries")
    assert count("pending") == "0"
    assert len(target.recorder.received) == 12
    assert "relay" in driver.find_element(By.CSS_SELECTOR, f'tr[data-domain="{DOMAIN}"] .mode').text
    driver.get(f"{admin_node.url}/")
    wait_for(lambda: charted("delivered"), what="the deliveries on the chart")
    wait_for(lambda: count("delivered") == "12", what="overview after reload")
    screenshot(driver, "overview.png")

    driver.get(f"{admin_node.url}/messages?state=delivered")
    links = wait_for(
        lambda: driver.find_elements(By.CSS_SELECTOR, "a.message-link"), what="message list"
    )
    assert len(links) == 12
    queue_id = links[0].text
    links[0].click()
    wait_for(lambda: driver.find_elements(By.ID, "queue-id"), what="message page")
    assert driver.find_element(By.ID, "queue-id").text == queue_id
    states = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "table.recipients .state")]
    assert states == ["delivered"]
    attempts = driver.find_element(By.CSS_SELECTOR, "table.attempts").text
    assert "250" in attempts
    assert "Subject: test message" in driver.find_element(By.CSS_SELECTOR, "pre.headers").text
    screenshot(driver, "message.png")

    entries = api.get("/api/v1/audit").json()["entries"]
    assert (entries[0]["actor"], entries[0]["action"]) == ("dashboard", "domain.release")
    api.close()
