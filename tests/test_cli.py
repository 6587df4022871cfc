"""The ``mxspool`` command line on a real SQLite store: names, output, exit codes."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from mxspool import cli as cli_module
from mxspool.actor import cli_actor
from mxspool.body import BodyBuffer
from mxspool.envelope import Envelope, MailParams, Recipient
from mxspool.ids import new_queue_id
from mxspool.operations import REPORT_COLUMNS
from mxspool.store import create_store
from mxspool.store.base import ClientInfo, IncomingMessage, RecipientOutcome, RecipientState

_BIN = Path(sys.executable).parent / "mxspool"
MXSPOOL = str(_BIN) if _BIN.exists() else (shutil.which("mxspool") or "")


class Spool:
    """A config file and its SQLite store; runs CLI commands and seeds mail directly."""

    def __init__(self, root: Path) -> None:
        self.db = root / "data" / "spool.db"
        self.url = f"sqlite:///{self.db}"
        self.config = root / "mxspool.toml"
        self.config.write_text(f'[store]\nurl = "{self.url}"\n')
        self.runner = CliRunner()

    def run(self, *args: str, code: int = 0) -> Result:
        result = self.runner.invoke(cli_module.cli, ["--config", str(self.config), *args])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        assert result.exit_code == code, (args, result.exit_code, result.output)
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json").stdout)

    def put(self, *rcpts: str, body: bytes = b"Subject: t\r\n\r\nbody\r\n") -> str:
        queue_id = new_queue_id()

        async def work() -> None:
            store = create_store(self.url)
            await store.open()
            try:
                buffer = BodyBuffer(1 << 20)
                buffer.write(body)
                await store.accept_message(
                    IncomingMessage(
                        id=queue_id,
                        envelope=Envelope(
                            "sender@src.test", MailParams(), tuple(Recipient(r) for r in rcpts)
                        ),
                        client=ClientInfo(address="192.0.2.7", helo="client.src.test"),
                        received_at=time.time(),
                        message_id=f"<{queue_id}@src.test>",
                        body=buffer,
                    )
                )
            finally:
                await store.close()

        asyncio.run(work())
        return queue_id

    def finish(self, domain: str, state: RecipientState, reply: str = "250 ok") -> int:
        """Do the delivery engine's part: claim what is due and record ``state`` for it."""

        async def work() -> int:
            store = create_store(self.url)
            await store.open()
            try:
                jobs = await store.claim_due("test", time.time(), 60.0, 1000, domain)
                outcomes = [
                    RecipientOutcome(r.id, state, reply, "mx.target.test:25")
                    for job in jobs
                    for r in job.recipients
                ]
                await store.record_outcomes("test", outcomes)
                return len(outcomes)
            finally:
                await store.close()

        return asyncio.run(work())


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path)


# -- configuration and plumbing -------------------------------------------------------------


def test_config_after_the_subcommand(spool: Spool) -> None:
    runner = CliRunner()
    added = runner.invoke(
        cli_module.cli,
        [
            "domain",
            "add",
            "example.test",
            "--route",
            "mx.example.net",
            "--config",
            str(spool.config),
        ],
    )
    assert added.exit_code == 0, added.output
    listed = runner.invoke(
        cli_module.cli, ["domain", "list", "--json", "--config", str(spool.config)]
    )
    assert [d["domain"] for d in json.loads(listed.stdout)] == ["example.test"]
    assert spool.db.exists()


def test_unknown_config_key_exits_2_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/s.db"\nmin_fre_space = "1GiB"\n')
    result = CliRunner().invoke(cli_module.cli, ["status", "--config", str(config)])
    assert result.exit_code == 2
    assert "min_fre_space" in result.stderr
    assert "unknown key" in result.stderr
    missing = CliRunner().invoke(cli_module.cli, ["--config", str(tmp_path / "no.toml"), "status"])
    assert missing.exit_code == 2
    assert "does not exist" in missing.stderr


def test_serve_checks_the_configuration_first(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[smtp]\nlisten = ["nowhere"]\n')
    result = CliRunner().invoke(cli_module.cli, ["serve", "--config", str(config)])
    assert result.exit_code == 2
    assert "smtp.listen" in result.stderr


def test_usage_errors_exit_2(spool: Spool) -> None:
    spool.run("domain", "frobnicate", code=2)
    spool.run("report", "--format", "xml", code=2)


# -- domains -------------------------------------------------------------------------------


def test_domain_lifecycle(spool: Spool) -> None:
    out = spool.run(
        "domain",
        "add",
        "Example.TEST",
        "--route",
        "mx1.example.net",
        "--route",
        "[2001:db8::1]:2525",
        "--tls",
        "require",
        "--hold",
    ).stdout
    assert "added example.test" in out and "mode hold" in out
    spool.run("domain", "add", "example.org", "--mx", "--profile", "exchange-online")
    domains = spool.json("domain", "list")
    assert [d["domain"] for d in domains] == ["example.org", "example.test"]
    test = domains[1]
    assert test["routes"] == ["mx1.example.net:25", "[2001:db8::1]:2525"]
    assert (test["mode"], test["tls"], test["mx"]) == ("hold", "require", False)
    assert domains[0]["mx"] is True and domains[0]["profile"] == "exchange-online"

    table = spool.run("domain", "list").stdout
    assert "example.test" in table and "[2001:db8::1]:2525" in table

    shown = spool.json("domain", "show", "example.test")
    assert shown["status"]["held"] == 0 and shown["mode"] == "hold"
    assert "mx1.example.net:25" in spool.run("domain", "show", "example.test").stdout

    routed = spool.json("domain", "route", "example.test", "--route", "new.example.net:26")
    assert routed["routes"] == ["new.example.net:26"] and routed["tls"] == "require"
    assert "tls off" in spool.run("domain", "route", "example.test", "--tls", "off").stdout

    spool.run("domain", "release", "example.test", "--rate", "600/min")
    shown = spool.json("domain", "show", "example.test")
    assert shown["mode"] == "relay" and shown["rate_per_s"] == 10.0
    assert shown["released_at"].endswith("Z")
    spool.run("domain", "release", "example.test")  # already relaying: fine
    assert "in hold" in spool.run("domain", "hold", "example.test").stdout
    assert spool.json("domain", "show", "example.test")["mode"] == "hold"

    assert "removed" in spool.run("domain", "remove", "example.org").stdout
    assert [d["domain"] for d in spool.json("domain", "list")] == ["example.test"]


def test_domain_errors(spool: Spool) -> None:
    spool.run("domain", "add", "example.test", "--route", "mx.example.net")
    dup = spool.run("domain", "add", "example.test", "--route", "x.example.net", code=1)
    assert "already exists" in dup.stderr and "domain route" in dup.stderr

    bad_name = spool.run("domain", "add", "not_a_domain", "--route", "mx.example.net", code=2)
    assert "not a valid DNS name" in bad_name.stderr
    assert "IP address" in spool.run("domain", "add", "10.0.0.1", "--route", "x", code=2).stderr
    assert "no dot" in spool.run("domain", "add", "intranet", "--route", "x", code=2).stderr
    bad_route = spool.run("domain", "add", "example.org", "--route", "mx:70000", code=2)
    assert "bad route" in bad_route.stderr and "HOST[:PORT]" in bad_route.stderr
    no_route = spool.run("domain", "add", "example.org", code=2)
    assert "--route" in no_route.stderr and "--mx" in no_route.stderr
    bad_tls = spool.run("domain", "add", "example.org", "--route", "x", "--tls", "yes", code=2)
    assert "verify, require, opportunistic, off" in bad_tls.stderr
    assert (
        "exchange-online"
        in spool.run(
            "domain", "add", "example.org", "--route", "x", "--profile", "gmail", code=2
        ).stderr
    )
    assert [d["domain"] for d in spool.json("domain", "list")] == ["example.test"]

    for args in (
        ("domain", "show", "nowhere.test"),
        ("domain", "hold", "nowhere.test"),
        ("domain", "release", "nowhere.test"),
        ("domain", "route", "nowhere.test", "--route", "x"),
        ("domain", "remove", "nowhere.test"),
    ):
        missing = spool.run(*args, code=1)
        assert "no domain nowhere.test" in missing.stderr
        assert "domain list" in missing.stderr
    assert "nothing to change" in spool.run("domain", "route", "example.test", code=2).stderr
    assert (
        "not a rate"
        in spool.run("domain", "release", "example.test", "--rate", "lots", code=2).stderr
    )


def test_remove_refuses_while_mail_is_pending(spool: Spool) -> None:
    spool.run("domain", "add", "example.test", "--route", "mx.example.net", "--hold")
    spool.put("a@example.test")
    refused = spool.run("domain", "remove", "example.test", code=1)
    assert "--force" in refused.stderr
    assert [d["domain"] for d in spool.json("domain", "list")] == ["example.test"]
    spool.run("domain", "remove", "example.test", "--force")
    assert spool.json("domain", "list") == []


def test_release_only_canary(spool: Spool) -> None:
    spool.run("domain", "add", "example.test", "--route", "mx.example.net", "--hold")
    spool.put("canary@example.test", "b@example.test")
    spool.put("canary@example.test")
    spool.put("b@example.test")
    out = spool.run("domain", "release", "example.test", "--only", "canary@example.test").stdout
    assert "released 2 recipients for canary@example.test" in out
    assert "stays in hold" in out
    status = spool.json("domain", "show", "example.test")
    assert status["mode"] == "hold"
    assert (status["status"]["held"], status["status"]["pending"]) == (2, 2)
    none = spool.run("domain", "release", "example.test", "--only", "zed@example.test")
    assert "released 0 recipients" in none.stdout and "nothing was waiting" in none.stderr
    wrong = spool.run("domain", "release", "example.test", "--only", "a@other.test", code=2)
    assert "not in domain example.test" in wrong.stderr


def test_release_wait_returns_once_drained(spool: Spool) -> None:
    spool.run("domain", "add", "example.test", "--route", "mx.example.net")
    spool.put("a@example.test")
    assert spool.finish("example.test", RecipientState.DELIVERED) == 1
    result = spool.run("domain", "release", "example.test", "--wait")
    assert "done: 1 delivered, 0 parked" in result.stdout


# -- queue ---------------------------------------------------------------------------------


def test_queue_list_show_export_discard_retry(spool: Spool) -> None:
    spool.run("domain", "add", "example.test", "--route", "mx.example.net", "--hold")
    spool.run("domain", "add", "example.org", "--route", "mx.example.net")
    body = b"Subject: exact\r\n\r\nbinary \x00\xff\xfe caf\xc3\xa9\r\nbare\nlf\r\n" * 1000
    first = spool.put("a@example.test", "b@example.org", body=body)
    second = spool.put("c@example.org")

    listed = spool.json("queue", "list")
    assert [(e["id"], e["rcpt"], e["state"]) for e in listed] == [
        (first, "a@example.test", "held"),
        (first, "b@example.org", "pending"),
        (second, "c@example.org", "pending"),
    ]
    held = spool.json("queue", "list", "--state", "held")
    assert [e["rcpt"] for e in held] == ["a@example.test"]
    org = spool.json("queue", "list", "--domain", "example.org", "--limit", "1")
    assert [e["rcpt"] for e in org] == ["b@example.org"]
    table = spool.run("queue", "list")
    assert first in table.stdout and "a@example.test" in table.stdout
    assert "unknown state" in spool.run("queue", "list", "--state", "lost", code=2).stderr

    shown = spool.json("queue", "show", first)
    assert shown["id"] == first and shown["size"] == len(body)
    assert [r["rcpt"] for r in shown["recipients"]] == ["a@example.test", "b@example.org"]
    assert "client.src.test" in spool.run("queue", "show", first).stdout

    exported = spool.run("queue", "export", first)
    assert exported.stdout_bytes == body
    missing = spool.run("queue", "export", "NOSUCHID", code=1)
    assert missing.stdout_bytes == b"" and "no message NOSUCHID" in missing.stderr
    assert "queue list" in spool.run("queue", "show", "NOSUCHID", code=1).stderr

    assert spool.finish("example.org", RecipientState.PARKED, "550 5.1.1 unknown") == 2
    assert len(spool.json("queue", "list", "--state", "parked")) == 2
    assert "1 recipient back" in spool.run("queue", "retry", second).stdout
    assert (
        "1 recipient back"
        in spool.run("queue", "retry", "--parked", "--domain", "example.org").stdout
    )
    assert spool.json("queue", "list", "--state", "parked") == []
    assert "exactly one" in spool.run("queue", "retry", code=2).stderr

    assert "discarded 2 recipients" in spool.run("queue", "discard", first).stdout
    states = {e["rcpt"]: e["state"] for e in spool.json("queue", "list")}
    assert states == {
        "a@example.test": "discarded",
        "b@example.org": "discarded",
        "c@example.org": "pending",
    }
    assert "no message" in spool.run("queue", "discard", "NOSUCHID", code=1).stderr

    # Sending a DSN is covered with a real target in tests/delivery/test_bounce.py.
    assert "no message NOSUCHID" in spool.run("queue", "bounce", "NOSUCHID", code=1).stderr


# -- status, report, audit -----------------------------------------------------------------


def test_status_json_shape(spool: Spool) -> None:
    spool.run("domain", "add", "example.test", "--route", "mx.example.net", "--hold")
    spool.run("domain", "add", "example.org", "--route", "mx.example.net")
    spool.put("a@example.test", "b@example.test", "c@example.org")
    spool.put("d@example.org")
    assert spool.finish("example.org", RecipientState.DELIVERED) == 2
    spool.put("e@example.org")

    data = spool.json("status")
    rows = {row["domain"]: row for row in data["domains"]}
    fields = {
        "domain",
        "mode",
        "held",
        "pending",
        "delivering",
        "delivered",
        "parked",
        "bounced",
        "discarded",
        "oldest_pending_age_s",
        "delivery_rate_per_min",
        "stage",  # the migration stage (mxspool.stage)
    }
    assert all(set(row) == fields for row in rows.values())
    assert rows["example.test"]["mode"] == "hold"
    assert rows["example.test"]["held"] == 2
    assert isinstance(rows["example.test"]["oldest_pending_age_s"], float)
    assert rows["example.org"]["delivered"] == 2 and rows["example.org"]["pending"] == 1
    assert rows["example.org"]["delivery_rate_per_min"] == 2
    totals = data["totals"]
    assert set(totals) == fields - {"domain", "mode", "stage"}
    assert (totals["held"], totals["pending"], totals["delivered"]) == (2, 1, 2)
    table = spool.run("status").stdout
    assert "example.test" in table and "total" in table


def test_report_formats_and_check(spool: Spool) -> None:
    spool.run("domain", "add", "example.test", "--route", "mx.example.net")
    spool.run("domain", "add", "example.org", "--route", "mx.example.net", "--hold")
    done = spool.put("a@example.test")
    spool.finish("example.test", RecipientState.DELIVERED, "250 2.0.0 OK queued")
    held = spool.put("b@example.org", "c@example.org")

    rows = list(csv.DictReader(io.StringIO(spool.run("report").stdout)))
    assert rows and tuple(rows[0]) == REPORT_COLUMNS
    assert [(r["id"], r["rcpt"], r["state"]) for r in rows] == [
        (done, "a@example.test", "delivered"),
        (held, "b@example.org", "held"),
        (held, "c@example.org", "held"),
    ]
    assert rows[0]["remote_reply"] == "250 2.0.0 OK queued"
    assert rows[0]["received_at"].endswith("Z") and rows[0]["delivered_at"].endswith("Z")
    assert rows[1]["delivered_at"] == ""

    as_json = json.loads(spool.run("report", "--format", "json", "--domain", "example.test").stdout)
    assert [tuple(row) for row in as_json] == [REPORT_COLUMNS]
    assert as_json[0]["size"] == len(b"Subject: t\r\n\r\nbody\r\n")
    assert as_json[0]["attempts"] == 1 and as_json[0]["delivered_at"].endswith("Z")

    check = spool.run("report", "--check", code=1)
    assert [r["rcpt"] for r in csv.DictReader(io.StringIO(check.stdout))] == [
        "b@example.org",
        "c@example.org",
    ]
    assert "2 of 3 recipients not final" in check.stderr
    ok = spool.run("report", "--check", "--domain", "example.test", "--format", "json")
    assert json.loads(ok.stdout) == [] and "all 1 recipient final" in ok.stderr
    spool.run("queue", "discard", held)
    spool.run("report", "--check")


def test_audit_records_cli_actions(spool: Spool) -> None:
    assert "no operator actions" in spool.run("audit").stdout
    spool.run("domain", "add", "example.test", "--route", "mx.example.net", "--hold")
    spool.run("domain", "route", "example.test", "--route", "new.example.net")
    spool.run("domain", "release", "example.test")
    spool.run("domain", "add", "bad_name.test", "--route", "x", code=2)  # not recorded
    entries = spool.json("audit")
    me = cli_actor()  # the OS user (tests/test_audit_actor.py checks its forms)
    assert [(e["actor"], e["action"], e["target"]) for e in entries] == [
        (me, "domain.release", "example.test"),
        (me, "domain.route", "example.test"),
        (me, "domain.add", "example.test"),
    ]
    assert entries[0]["at"].endswith("Z")
    assert len(spool.json("audit", "--limit", "1")) == 1
    assert "domain.route" in spool.run("audit").stdout


# -- the installed console script ----------------------------------------------------------

needs_script = pytest.mark.skipif(not MXSPOOL, reason="the mxspool console script is not installed")


def _script(spool: Spool, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [MXSPOOL, *args], capture_output=True, timeout=30, check=False, cwd=spool.config.parent
    )


@needs_script
def test_console_script_round_trip(spool: Spool) -> None:
    spool.run("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--hold")
    body = b"Subject: raw\r\n\r\n\x00\x01\xff\r\n.\r\n..\r\n"
    queue_id = spool.put("a@example.test", body=body)
    exported = _script(spool, "queue", "export", queue_id, "--config", str(spool.config))
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout == body
    bad = spool.config.parent / "bad.toml"
    bad.write_text("[smtp]\nlisten_on = []\n")
    broken = _script(spool, "status", "--config", str(bad))
    assert broken.returncode == 2 and b"listen_on" in broken.stderr


@needs_script
def test_console_script_release_wait_follows_delivery(spool: Spool) -> None:
    spool.run("domain", "add", "example.test", "--route", "mx.example.net", "--hold")
    spool.put("a@example.test", "b@example.test")
    spool.put("c@example.test")
    waiting = subprocess.Popen(
        [MXSPOOL, "--config", str(spool.config), "domain", "release", "example.test", "--wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # Deliver once the release is in the store, as a running server would.
        deadline = time.monotonic() + 10
        while spool.json("domain", "show", "example.test")["mode"] != "relay":
            assert time.monotonic() < deadline, "release did not happen"
            time.sleep(0.05)
        assert waiting.poll() is None  # still waiting: three recipients to go
        assert spool.finish("example.test", RecipientState.DELIVERED) == 3
        stdout, stderr = waiting.communicate(timeout=10)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 0, stderr
    assert b"done: 3 delivered, 0 parked" in stdout
    assert b"waiting for delivery" in stderr
