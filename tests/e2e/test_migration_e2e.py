"""A three-domain tenant-to-tenant migration, end to end, over real SMTP against `mxspool serve`.

The story an operator lives through (docs/interface.md, "Migrations"): three domains of the
source tenant relay through the spooler to it; the migration holds all three at once (one
audit entry); mail accumulates while nothing reaches either tenant; the engineer confirms the
runbook's manual steps (detached, attached, verified) per domain; the route moves to the
target tenant; the dry run plans the release; the release drains the backlog under the target's
per-recipient limit; the signed ledger proves what happened and a tampered copy is caught.

The stand-in tenants are local SMTP servers (tests/e2e/tenant.py). The target enforces a
per-recipient limit, the way Exchange Online enforces 3,600 messages an hour per recipient,
over a short sliding window: ``TARGET_LIMIT`` messages in any ``WINDOW`` seconds. mxspool keeps
its real limit (``[delivery] per_recipient_hourly_limit`` = 3,600: a minute's burst of 60, then
one a ~1.02 s), which never puts more than 60 + 6 messages in 6 s, while an unpaced burst of the
hot mailbox's ``HOT`` messages would meet the target's limit (checked first against the real
server: ``Tenant.check_limit``). So the release takes about (HOT - 60) x 1.02 s however fast
the rest goes, and the dry run's ETA must say so: the measured release time is compared with
it (``ETA_FACTOR``).

Every message has its own sender: Exchange Online's other limit, 1,200 an hour per sender and
recipient pair, is kept by the pacer too but not planned for by the dry run (reported).

Notifications go to a webhook (HMAC checked by the receiver) and by mail to a local SMTP
server: backlog_high while the mail accumulates, release_started and release_finished (with
the totals) per domain.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import smtplib
import time
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from dnslib import RR

from tests.conftest import Spooler
from tests.delivery.dnsserver import DnsServer
from tests.delivery.target import Target
from tests.e2e.tenant import Tenant
from tests.notify_receiver import Receiver
from tests.waiting import stays, wait_until

NAME = "contoso-to-fabrikam"
DOMAINS = ("alpha.test", "beta.test", "gamma.test")
SOURCE_TENANT = "contoso.onmicrosoft.com"
TARGET_TENANT = "fabrikam.onmicrosoft.com"
SECRET = "migration-hook-secret"
OPS = "ops@example.net"
EVENTS = ["backlog_high", "release_started", "release_finished"]

PER_HOUR = 3600
"""mxspool's per-recipient limit (Exchange Online's): a burst of 60, then one every 3600/3540 s."""
BURST = PER_HOUR // 60
INTERVAL = 3600 / (PER_HOUR - BURST)
WINDOW = 6.0
TARGET_LIMIT = 70
"""The target's limit: messages per recipient in any WINDOW seconds (mxspool's pace: <= 66)."""
HOT = f"hot@{DOMAINS[0]}"
HOT_MESSAGES = 75
"""More than TARGET_LIMIT: an unpaced release would meet the target's limit."""
RATE = "6000/min"
"""The release's shared rate for the target tenant: fast, so the per-recipient limit decides."""
ETA_FACTOR = (0.5, 2.0)
"""The measured release time must lie within these multiples of the dry run's ETA."""
BACKLOG_THRESHOLD = 10

# Mail sent while the migration holds: recipient -> messages (one recipient each) ...
HELD: dict[str, int] = {
    HOT: HOT_MESSAGES,
    **{f"a{n}@alpha.test": 4 for n in range(1, 4)},
    **{f"b{n}@beta.test": 4 for n in range(1, 5)},
    **{f"g{n}@gamma.test": 6 for n in range(1, 3)},
}
# ... plus messages to one recipient in every domain at once.
SPANNING = [["a1@alpha.test", "b1@beta.test", "g1@gamma.test"]] * 2
RELAYED_PER_DOMAIN = 2
"""Messages per domain in the relay phase (to the source tenant), below the threshold."""
SPOOLER_HOST = "mx.test.local"
"""The spooler's [smtp] hostname (tests/conftest.py): where MX points during the move."""
TARGET_HOST = "fabrikam-mx.test"
"""The target tenant's MX host (resolved by the test's DNS server to its stand-in)."""
STAGES = [
    "planned", "mx-to-spooler", "relaying", "holding", "detached", "attached", "verified",
    "released", "mx-to-target", "done",
]  # fmt: skip


def zone(mx_host: str) -> str:
    """The test's DNS: every domain's MX at ``mx_host``; the target's host at 127.0.0.1."""
    lines = [f"{domain}. 300 IN MX 10 {mx_host}." for domain in DOMAINS]
    return "\n".join([*lines, f"{TARGET_HOST}. 300 IN A 127.0.0.1"]) + "\n"


class Mail:
    """What the test sent and the spooler accepted: token -> recipients."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sent: dict[str, list[str]] = {}
        self._n = 0

    def send(self, batches: list[list[str]], phase: str) -> list[str]:
        tokens = []
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
            for rcpts in batches:
                self._n += 1
                token = f"{phase}-{self._n:04d}"
                body = (
                    f"From: <sender{self._n}@partner.example>\r\nTo: {', '.join(rcpts)}\r\n"
                    f"Subject: {token}\r\nMessage-ID: <{token}@partner.example>\r\n"
                    f"X-Test-Token: {token}\r\n\r\nmail {token}\r\n"
                )
                refused = client.sendmail(f"sender{self._n}@partner.example", rcpts, body.encode())
                assert not refused, refused
                self.sent[token] = list(rcpts)
                tokens.append(token)
        return tokens


_TOKEN = re.compile(rb"^X-Test-Token: (\S+)\r?$", re.M)


def token_of(data: bytes) -> str:
    found = _TOKEN.search(data)
    return found.group(1).decode() if found else ""


def arrivals(tenant: Tenant) -> collections.Counter[tuple[str, str]]:
    """(token, recipient) -> how often the tenant accepted it."""
    return collections.Counter((token_of(data), rcpt) for rcpt, data in tenant.deliveries())


def add_notify(spooler: Spooler, *entries: dict[str, Any]) -> None:
    text = spooler.config.read_text()
    for entry in entries:
        text += "\n[[notify]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in entry.items())
    spooler.config.write_text(text)


def show(spooler: Spooler) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(spooler.cli("migration", "show", NAME, "--json").stdout)
    return data


def migration_audit(spooler: Spooler) -> dict[str, list[dict[str, Any]]]:
    """The audit log's migration.* entries: action -> entries."""
    found: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for entry in json.loads(spooler.cli("audit", "--limit", "1000", "--json").stdout):
        if entry["action"].startswith("migration."):
            found[entry["action"]].append(entry)
    return found


def mails(ops: Target, event: str) -> dict[str, Any]:
    """The notification mails of ``event``: domain -> the message."""
    found = {}
    for item in ops.recorder.received:
        message = message_from_bytes(item.data)
        prefix = f"[mxspool] {event}: "
        if OPS in item.rcpt_tos and str(message["Subject"]).startswith(prefix):
            found[str(message["Subject"])[len(prefix) :]] = message
    return found


def by_domain(receiver: Receiver, event: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for payload in receiver.accepted(event):
        assert payload["domain"] not in found, f"{event} for {payload['domain']} told twice"
        found[payload["domain"]] = payload
    return found


@pytest.fixture
def servers() -> Iterator[dict[str, Any]]:
    started: dict[str, Any] = {
        "source": Tenant(SOURCE_TENANT).start(),
        "target": Tenant(TARGET_TENANT, per_recipient=TARGET_LIMIT, window=WINDOW).start(),
        "ops": Target().start(),
        "control": Target().start(),
        "hook": Receiver(SECRET.encode()).start(),
        "dns": DnsServer(zone(SPOOLER_HOST)).start(),
    }
    yield started
    for server in started.values():
        server.stop()


def test_three_domain_migration_end_to_end(
    spooler_factory: Any, servers: dict[str, Any], tmp_path: Path
) -> None:
    begun = time.monotonic()
    source: Tenant = servers["source"]
    target: Tenant = servers["target"]
    ops: Target = servers["ops"]
    control: Target = servers["control"]
    hook: Receiver = servers["hook"]
    dns: DnsServer = servers["dns"]
    target.check_limit(f"canary@{DOMAINS[0]}")  # the target's limit bites an unpaced burst

    spooler: Spooler = spooler_factory(
        delivery={"per_recipient_hourly_limit": PER_HOUR, "resolver": dns.address},
        notifications={"backlog_threshold": BACKLOG_THRESHOLD, "interval": "0.2s"},
    )
    add_notify(
        spooler,
        {"name": "hook", "url": hook.url, "secret": SECRET, "events": EVENTS, "backoff": "0.2s"},
        {
            "name": "mail",
            "to": OPS,
            "relay": f"127.0.0.1:{ops.port}",
            "tls": "off",
            "events": EVENTS,
            "backoff": "0.2s",
        },
    )
    source_route = f"127.0.0.1:{source.port}"
    for domain in DOMAINS:
        spooler.cli(
            "domain", "add", domain, "--route", source_route, "--tls", "off",
            "--profile", "exchange-online",
        )  # fmt: skip
    made = json.loads(
        spooler.cli(
            "migration", "create", NAME, *(arg for d in DOMAINS for arg in ("--domain", d)),
            "--source-tenant", SOURCE_TENANT, "--target-tenant", TARGET_TENANT, "--json",
        ).stdout
    )  # fmt: skip
    assert made["domains"] == list(DOMAINS)
    assert (made["source_tenant"], made["target_tenant"]) == (SOURCE_TENANT, TARGET_TENANT)
    runbook = spooler.cli(
        "migration", "runbook", NAME, "--spooler-host", SPOOLER_HOST, "--spooler-ip", "192.0.2.25"
    ).stdout
    assert all(name in runbook for name in (*DOMAINS, SOURCE_TENANT, TARGET_TENANT))
    for domain in DOMAINS:  # MX moved to the spooler (the operator's cut-over, seen in DNS)
        checked = json.loads(spooler.cli("check", "dns", domain, "--json").stdout)
        assert checked["mx_at"] == "spooler", checked
    spooler.start()
    mail = Mail(spooler.port)

    # -- relay phase: mail flows through the spooler to the source tenant ------------------
    relayed = mail.send(
        [[f"r{n}@{d}"] for d in DOMAINS for n in range(RELAYED_PER_DOMAIN)], "relay"
    )
    wait_until(
        lambda: {token for token, _ in arrivals(source)} == set(relayed),
        30,
        "the relay phase's mail at the source tenant",
    )
    wait_until(
        lambda: all(
            any(e["stage"] == "relaying" for e in d["events"])
            for d in show(spooler)["domain_details"]
        ),
        15,
        "every domain recorded as relaying",
    )

    # -- hold: all three at once, one transaction, audited once ----------------------------
    spooler.cli("migration", "hold", NAME)
    at_source = len(source.deliveries())
    held = mail.send([[rcpt] for rcpt, count in HELD.items() for _ in range(count)], "held")
    held += mail.send(SPANNING, "held")
    held_rows = {d: 0 for d in DOMAINS}
    for token in held:
        for rcpt in mail.sent[token]:
            held_rows[rcpt.rpartition("@")[2]] += 1
    total_held = sum(held_rows.values())
    state = wait_until(
        lambda: (s := show(spooler))["totals"]["held"] == total_held and s,
        30,
        f"{total_held} recipients held",
    )
    assert {d["domain"]: d["mode"] for d in state["domain_details"]} == dict.fromkeys(
        DOMAINS, "hold"
    )
    assert {d["domain"]: d["status"]["held"] for d in state["domain_details"]} == held_rows

    # Nothing reaches either tenant, while the same server delivers a control message.
    started = time.monotonic()
    spooler.deliver_control(control.port, lambda: len(control.recorder.received))
    took = time.monotonic() - started
    print(f"\ncontrol delivered in {took:.1f} s; at {time.monotonic() - begun:.1f} s")
    stays(
        lambda: len(source.deliveries()) == at_source and not target.deliveries(),
        max(2.0, took),
        "no mail at either tenant during the hold",
    )

    # backlog_high for every domain (the threshold is low), by webhook and by mail.
    wait_until(lambda: len(by_domain(hook, "backlog_high")) == 3, 20, "backlog_high x 3")
    highs = by_domain(hook, "backlog_high")
    assert set(highs) == set(DOMAINS)
    for payload in highs.values():
        assert payload["details"]["threshold"] == BACKLOG_THRESHOLD
        assert payload["details"]["held"] >= BACKLOG_THRESHOLD, payload
    wait_until(lambda: set(mails(ops, "backlog_high")) == set(DOMAINS), 20, "backlog_high mails")

    # -- the runbook's manual steps, per domain; then the route moves to the target --------
    for domain in DOMAINS:
        for step in ("detached", "attached", "verified"):
            spooler.cli("migration", "step", NAME, domain, step, "--note", f"{step} by e2e")
    target_route = f"{TARGET_HOST}:{target.port}"
    spooler.cli(
        "migration", "route", NAME, "--route", target_route, "--tls", "off",
        "--profile", "exchange-online",
    )  # fmt: skip

    # -- the dry run: the plan, and its ETA; it changes nothing ----------------------------
    plan = json.loads(
        spooler.cli("migration", "release", NAME, "--dry-run", "--rate", RATE, "--json").stdout
    )
    expected_eta = (HOT_MESSAGES - BURST) * INTERVAL
    assert plan["messages"] == total_held
    assert plan["shared_rate"] is True  # one target tenant: one rate for all three
    alpha = next(d for d in plan["domains"] if d["domain"] == DOMAINS[0])
    assert alpha["per_recipient_hourly_limit"] == PER_HOUR
    assert alpha["recipients"][0]["address"] == HOT  # the slowest first
    assert alpha["recipients"][0]["messages"] == HOT_MESSAGES
    assert abs(plan["eta_s"] - expected_eta) < 1.0, (plan["eta_s"], expected_eta)
    eta = float(plan["eta_s"])
    assert show(spooler)["totals"]["held"] == total_held
    assert not target.deliveries()

    # -- the release, measured --------------------------------------------------------------
    released_at = time.time()
    waited = spooler.cli("migration", "release", NAME, "--rate", RATE, "--wait").stdout
    assert "done: " in waited and " 0 parked" in waited, waited
    wait_until(
        lambda: sum(arrivals(target).values()) >= total_held, 30, "the backlog at the target"
    )
    last = max(item.at for item in target.tenant.received)
    measured = last - released_at
    print(
        f"\nrelease of {total_held} recipients ({HOT_MESSAGES} for {HOT}): dry-run ETA "
        f"{eta:.1f} s, measured {measured:.1f} s (x{measured / eta:.2f})"
    )
    assert ETA_FACTOR[0] * eta <= measured <= ETA_FACTOR[1] * eta, (eta, measured)

    # Paced per recipient: the target's limit was never met, the hot mailbox spread out.
    assert target.tenant.limited == [], target.tenant.limited[:5]
    hot = sorted(item.at for item in target.tenant.received if HOT in item.rcpt_tos)
    assert len(hot) == HOT_MESSAGES
    assert hot[-1] - hot[0] >= 0.8 * (HOT_MESSAGES - BURST) * INTERVAL, hot[-1] - hot[0]
    print(f"most for {HOT} in any {WINDOW:g} s: {target.tenant.max_in_window(HOT)}")

    # -- nothing lost, nothing twice, nothing at the source after the hold ------------------
    expected = collections.Counter({(t, r): 1 for t in held for r in mail.sent[t]})
    assert arrivals(target) == expected
    assert len(source.deliveries()) == at_source
    assert arrivals(source) == collections.Counter(
        {(t, r): 1 for t in relayed for r in mail.sent[t]}
    )

    # -- notifications: started and finished per domain, with the totals --------------------
    wait_until(lambda: len(by_domain(hook, "release_finished")) == 3, 20, "release_finished x 3")
    started_events = by_domain(hook, "release_started")
    finished_events = by_domain(hook, "release_finished")
    assert set(started_events) == set(finished_events) == set(DOMAINS)
    for domain in DOMAINS:
        assert started_events[domain]["details"]["to_deliver"] == held_rows[domain]
        details = finished_events[domain]["details"]
        delivered = held_rows[domain] + RELAYED_PER_DOMAIN
        assert (details["delivered"], details["parked"], details["bounced"]) == (delivered, 0, 0)
    assert all(request.signed for request in hook.requests), "every webhook call HMAC-signed"
    wait_until(
        lambda: set(mails(ops, "release_finished")) == set(DOMAINS), 20, "release_finished mails"
    )
    assert set(mails(ops, "release_started")) == set(DOMAINS)

    # -- MX moves to the target; with every recipient final the domains are done ------------
    dns.server.server.resolver.records = RR.fromZone(zone(TARGET_HOST))
    for domain in DOMAINS:
        result = spooler.cli("check", "dns", domain, "--json", check=False)
        assert json.loads(result.stdout)["mx_at"] == "route", result.stdout

    # -- hold, route and release: each one audit entry naming the migration and its domains --
    audited = migration_audit(spooler)
    for action in ("migration.hold", "migration.route", "migration.release"):
        [entry] = audited[action]
        assert entry["target"] == NAME, entry
        assert f"domains={','.join(DOMAINS)}" in entry["detail"], entry
    assert len(audited["migration.step"]) == 3 * len(DOMAINS)

    # -- stages, in order, per domain -------------------------------------------------------
    final = show(spooler)
    for detail in final["domain_details"]:
        names = [event["stage"] for event in detail["events"]]
        assert names == STAGES, (detail["domain"], names)
        assert detail["stage"] == "done"
        assert set(detail["steps"]) == {"detached", "attached", "verified"}
    for stage in ("holding", "released"):  # one transaction each: one time for all three
        times = {
            e["at"] for d in final["domain_details"] for e in d["events"] if e["stage"] == stage
        }
        assert len(times) == 1, (stage, times)

    # -- the signed ledger, and a tampered copy ---------------------------------------------
    key = tmp_path / "ledger.key"
    spooler.cli("ledger", "keygen", "--out", str(key))
    public = f"{key}.pub"
    checked = tmp_path / "check.csv"
    spooler.cli(
        "migration", "report", NAME, "--check", "--sign", "--key", str(key), "--out", str(checked)
    )
    verified = spooler.cli("ledger", "verify", str(checked), "--public-key", public)
    assert verified.stdout.startswith("OK:"), verified.stdout
    manifest = json.loads(Path(f"{checked}.manifest.json").read_text())
    assert manifest["scope"]["migration"] == NAME
    assert manifest["scope"]["domains"] == list(DOMAINS)

    ledger = tmp_path / "ledger.csv"
    spooler.cli("migration", "report", NAME, "--sign", "--key", str(key), "--out", str(ledger))
    spooler.cli("ledger", "verify", str(ledger), "--public-key", public)
    manifest = json.loads(Path(f"{ledger}.manifest.json").read_text())
    rows = total_held + RELAYED_PER_DOMAIN * len(DOMAINS)
    assert manifest["rows"] == rows
    assert manifest["totals"]["delivered"] == rows

    tampered = tmp_path / "tampered" / "ledger.csv"
    tampered.parent.mkdir()
    for suffix in ("", ".manifest.json", ".manifest.sig"):
        shutil.copyfile(f"{ledger}{suffix}", f"{tampered}{suffix}")
    lines = tampered.read_bytes().split(b"\r\n")
    assert {line.split(b",")[3].decode() for line in lines[1:] if line} == {
        rcpt for recipients in mail.sent.values() for rcpt in recipients
    }
    row = next(n for n, line in enumerate(lines) if f",{HOT},".encode() in line)
    assert lines[row].count(b",delivered,") == 1
    lines[row] = lines[row].replace(b",delivered,", b",bounced,")
    tampered.write_bytes(b"\r\n".join(lines))
    failed = spooler.cli("ledger", "verify", str(tampered), "--public-key", public, check=False)
    assert failed.returncode == 1, (failed.stdout, failed.stderr)
    assert f"FAIL: the chain breaks at row {row} " in failed.stdout, failed.stdout

    print(f"migration end to end: {time.monotonic() - begun:.1f} s")
