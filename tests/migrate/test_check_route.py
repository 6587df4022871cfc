"""``check route`` and ``check recipients`` against an aiosmtpd target with STARTTLS."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from mxspool.store.base import Store
from mxspool.store.sqlite import SqliteStore
from tests.conftest import free_port
from tests.delivery.target import Target
from tests.migrate.conftest import Cli
from tests.store.test_contract import make_message

DOMAIN = "example.test"
NOT_READY = "550 5.4.1 Recipient address rejected: Access denied"


@pytest.fixture
def tls_target(ca: trustme.CA) -> Iterator[Target]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.target.test").configure_cert(context)
    server = Target(tls_context=context).start()
    yield server
    server.stop()


def _store_url(cli: Cli) -> str:
    return f"sqlite:///{cli.config.parent / 'spool.db'}"


def _put_held(cli: Cli, recipients: list[list[str]]) -> None:
    async def go() -> None:
        store: Store = SqliteStore(_store_url(cli))
        await store.open()
        try:
            for rcpts in recipients:
                await store.accept_message(make_message(rcpts))
        finally:
            await store.close()

    asyncio.run(go())


def test_check_route_go(mxcli: Cli, tls_target: Target) -> None:
    mxcli("domain", "add", DOMAIN, "--route", f"mx.target.test:{tls_target.port}", "--hold")
    data = json.loads(mxcli("check", "route", DOMAIN, "--json").stdout)
    assert data["verdict"] == "go", data
    [hop] = data["hops"]
    assert hop["hop"] == f"mx.target.test[127.0.0.1]:{tls_target.port}"
    assert hop["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert hop["cert_verified"] is True and "mx.target.test" in hop["cert_names"]
    assert hop["size"] == 33554432
    assert hop["rcpt"] == [{"address": f"postmaster@{DOMAIN}", "code": 250, "reply": "2.1.5 Ok"}]
    assert hop["connect_ms"] is not None and hop["connect_ms"] >= 0
    # The probe never sends DATA: the target received no message.
    assert tls_target.recorder.received == [] and tls_target.recorder.mail_commands == 1
    table = mxcli("check", "route", DOMAIN).output
    assert "verdict: GO" in table and "certificate" in table


def test_check_route_no_go_on_wrong_name_and_closed_port(mxcli: Cli, tls_target: Target) -> None:
    closed = free_port()
    # By address the certificate (for mx.target.test) cannot match: no-go with tls=verify.
    mxcli(
        "domain", "add", DOMAIN,
        "--route", f"127.0.0.1:{tls_target.port}", "--route", f"127.0.0.1:{closed}",
    )  # fmt: skip
    result = mxcli("check", "route", DOMAIN, "--json", code=1)
    data = json.loads(result.stdout)
    assert data["verdict"] == "no-go"
    first, second = data["hops"]
    cert = next(f for f in first["findings"] if f["check"] == "certificate")
    assert cert["verdict"] == "fail" and "ca_file" in cert["fix"]
    # Still probed without verification, so the operator sees what the hop would answer.
    assert first["rcpt"][0]["code"] == 250
    connect = next(f for f in second["findings"] if f["check"] == "connect")
    assert connect["verdict"] == "fail" and "reachable" in connect["fix"]
    # tls=require accepts any certificate: the first hop is a go then (with a warning).
    mxcli("domain", "route", DOMAIN, "--route", f"127.0.0.1:{tls_target.port}", "--tls", "require")
    data = json.loads(mxcli("check", "route", DOMAIN, "--json").stdout)
    assert data["verdict"] == "go"


def test_check_recipients_ready_and_not_ready(mxcli: Cli, tls_target: Target) -> None:
    mxcli("domain", "add", DOMAIN, "--route", f"mx.target.test:{tls_target.port}", "--hold")
    tls_target.behaviour.rcpt_replies = {
        f"carol@{DOMAIN}": NOT_READY,
        f"dave@{DOMAIN}": "450 4.2.1 Try again later",
    }
    _put_held(
        mxcli,
        [
            [f"alice@{DOMAIN}", f"carol@{DOMAIN}"],
            [f"Alice@{DOMAIN}", f"bob@{DOMAIN}"],  # alice again, in another case
            [f"dave@{DOMAIN}"],
        ],
    )
    result = mxcli("check", "recipients", DOMAIN, "--json", "--rate", "50/s", code=1)
    data = json.loads(result.stdout)
    states = {item["address"]: (item["state"], item["reply"]) for item in data["recipients"]}
    assert states == {
        f"alice@{DOMAIN}": ("ready", "250 2.1.5 Ok"),
        f"carol@{DOMAIN}": ("not ready", "550 5.4.1 Recipient address rejected: Access denied"),
        f"bob@{DOMAIN}": ("ready", "250 2.1.5 Ok"),
        f"dave@{DOMAIN}": ("unknown", "450 4.2.1 Try again later"),
    }
    carol = next(item for item in data["recipients"] if item["address"].startswith("carol"))
    assert "does not exist at the target yet" in carol["hint"]
    # dave's 450 is a temporary refusal: unknown, not "not ready" (issue 11).
    assert (data["checked"], data["ready"], data["not_ready"], data["unknown"]) == (4, 2, 1, 1)
    assert tls_target.recorder.received == []
    table = mxcli("check", "recipients", DOMAIN, code=1).output
    assert "not ready" in table and "2 of 4 recipients ready" in table


def test_check_recipients_is_paced_and_handles_nothing_held(
    mxcli: Cli, tls_target: Target, tmp_path: Path
) -> None:
    mxcli("domain", "add", DOMAIN, "--route", f"mx.target.test:{tls_target.port}", "--hold")
    assert "nothing is held" in mxcli("check", "recipients", DOMAIN).output
    _put_held(mxcli, [[f"user{n}@{DOMAIN}"] for n in range(6)])
    import time

    started = time.monotonic()
    data = json.loads(mxcli("check", "recipients", DOMAIN, "--json", "--rate", "10/s").stdout)
    assert data["ready"] == 6
    # Six probes at 10/s take at least half a second.
    assert time.monotonic() - started >= 0.45
