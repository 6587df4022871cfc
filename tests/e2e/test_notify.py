"""Notifications end to end: a real ``mxspool serve`` tells a real webhook receiver (HMAC
checked) and a real SMTP server about the backlog, parked mail, a release and low disk; retries
a failing receiver; keeps accepting mail at full speed while a receiver hangs; and ``notify
test`` reports each target's result."""

from __future__ import annotations

import json
import smtplib
import socket
import time
from collections.abc import Iterator
from email import message_from_bytes
from typing import Any

import pytest

from tests.conftest import Spooler
from tests.delivery.target import Target
from tests.notify_receiver import Receiver
from tests.waiting import wait_until

SECRET = "s3cret-for-tests"
OPS = "ops@example.net"


def add_notify(spooler: Spooler, *entries: dict[str, Any]) -> None:
    """Append ``[[notify]]`` tables to the spooler's configuration."""
    text = spooler.config.read_text()
    for entry in entries:
        text += "\n[[notify]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in entry.items())
    spooler.config.write_text(text)


def send(spooler: Spooler, rcpts: list[str], number: int = 0) -> None:
    with smtplib.SMTP("127.0.0.1", spooler.port, timeout=10) as client:
        client.sendmail("sender@src.test", rcpts, f"Subject: m{number}\r\n\r\nbody\r\n".encode())


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(SECRET.encode()).start()
    yield server
    server.stop()


@pytest.fixture
def smtp_target() -> Iterator[Target]:
    server = Target().start()
    yield server
    server.stop()


def mails_to_ops(target: Target) -> list[Any]:
    return [message_from_bytes(r.data) for r in target.recorder.received if OPS in r.rcpt_tos]


def test_backlog_parked_release_disk_and_retries(
    spooler_factory: Any, receiver: Receiver, smtp_target: Target
) -> None:
    node: Spooler = spooler_factory(
        notifications={"backlog_threshold": 3, "interval": "0.2s", "disk_warning": "900TiB"}
    )
    add_notify(
        node,
        {"name": "hook", "url": receiver.url, "secret": SECRET, "backoff": "0.2s"},
        {
            "name": "mail",
            "to": OPS,
            "relay": f"127.0.0.1:{smtp_target.port}",
            "tls": "off",
            "events": ["release_finished", "parked"],
        },
    )
    route = f"127.0.0.1:{smtp_target.port}"
    node.cli("domain", "add", "hold.test", "--route", route, "--tls", "off", "--hold")
    smtp_target.behaviour.rcpt_replies["bad@hold.test"] = "550 5.1.1 no such user"
    receiver.script = [500, 500]  # the first notification (disk_low, at start) is retried
    node.start()

    # disk_low at start (free space is far below 900 TiB): two 500s, then 200; sent once.
    wait_until(lambda: receiver.accepted("disk_low"), 20, "disk_low accepted")
    tries = receiver.tries("disk_low")
    assert [t.status for t in tries] == [500, 500, 200]
    assert len({t.payload["id"] for t in tries}) == 1, "every retry carries the same event id"
    assert all(t.signed for t in tries)
    disk = receiver.accepted("disk_low")[0]
    assert disk["node"] == "mx.test.local" and disk["domain"] is None
    assert disk["details"]["warning_bytes"] == 900 * 2**40
    assert node.metric("mxspool_notification_retries_total", target="hook") == 2

    # Backlog: two recipients are below the threshold, the third crosses it: told once.
    send(node, ["a@hold.test", "b@hold.test"])
    send(node, ["bad@hold.test"], 1)
    wait_until(lambda: receiver.accepted("backlog_high"), 15, "backlog_high")
    send(node, ["c@hold.test"], 2)  # still above: no second notification
    high = receiver.accepted("backlog_high")[0]
    assert high["domain"] == "hold.test" and high["details"]["threshold"] == 3
    assert high["details"]["backlog"] >= 3 and high["details"]["held"] >= 3

    # Release (from the CLI, another process): started, a parked recipient, finished.
    wait_until(lambda: node.domain_status("hold.test")["held"] == 4, 10, "four held")
    # The detector looks every 0.2 s, and the release CLI takes longer than that to start: the
    # look before the release sees the four held recipients (to_deliver below).
    node.cli("domain", "release", "hold.test")
    finished = wait_until(lambda: receiver.accepted("release_finished"), 30, "release_finished")
    started = receiver.accepted("release_started")
    assert len(started) == 1 and started[0]["domain"] == "hold.test"
    assert started[0]["details"]["to_deliver"] == 4
    details = finished[0]["details"]
    assert (details["delivered"], details["parked"], details["bounced"]) == (3, 1, 0)
    assert details["discarded"] == 0
    parked = wait_until(lambda: receiver.accepted("parked"), 15, "parked")
    assert parked[0]["details"]["parked"] == 1 and parked[0]["domain"] == "hold.test"
    assert len(receiver.accepted("backlog_high")) == 1
    assert len(receiver.accepted("disk_low")) == 1, "told once while the disk stays low"

    # The email target got its two events (and only those), as plain text with the facts.
    mails = wait_until(lambda: len(mails_to_ops(smtp_target)) >= 2 and mails_to_ops(smtp_target))
    subjects = sorted(str(m["Subject"]) for m in mails)
    assert subjects == [
        "[mxspool] parked: hold.test",
        "[mxspool] release_finished: hold.test",
    ]
    finished_mail = next(m for m in mails if "release_finished" in str(m["Subject"]))
    text = finished_mail.get_payload(decode=True).decode()
    assert "delivered: 3" in text and "parked: 1" in text
    assert finished_mail["X-Mxspool-Event-Id"] == finished[0]["id"]
    assert finished_mail["Auto-Submitted"] == "auto-generated"

    # Bad signatures are detectable: a tampered body or a wrong secret fails verification.
    from mxspool.notify.signature import verify

    good = receiver.tries("release_finished")[0]
    stamp, signature = good.headers["x-mxspool-timestamp"], good.headers["x-mxspool-signature"]
    assert verify(SECRET.encode(), stamp, good.body, signature)
    assert not verify(SECRET.encode(), stamp, good.body.replace(b"3", b"4"), signature)
    assert not verify(b"another secret", stamp, good.body, signature)
    assert not verify(SECRET.encode(), str(int(stamp) - 1), good.body, signature)


def _hanging_listener() -> socket.socket:
    """A port that takes connections (kernel backlog) and never answers: a hung receiver."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def _intake_seconds(node: Spooler, messages: int, domains: list[str]) -> float:
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", node.port, timeout=10) as client:
        for number in range(messages):
            domain = domains[number % len(domains)]
            client.sendmail("s@src.test", [f"u{number}@{domain}"], b"Subject: x\r\n\r\nx\r\n")
    return time.monotonic() - started


def test_hung_receiver_never_slows_intake_and_queue_is_bounded(spooler_factory: Any) -> None:
    hung = _hanging_listener()
    domains = [f"d{n}.test" for n in range(6)]
    settings = {"backlog_threshold": 1, "interval": "0.2s", "queue_size": 2}

    def make(with_target: bool) -> Spooler:
        node: Spooler = spooler_factory(notifications=settings)
        if with_target:
            url = f"http://127.0.0.1:{hung.getsockname()[1]}/hook"
            add_notify(node, {"name": "hung", "url": url, "secret": SECRET, "timeout": "30s"})
        for domain in domains:
            node.cli("domain", "add", domain, "--route", "127.0.0.1:9", "--hold")
        node.start()
        return node

    try:
        control = make(False)  # positive control: the same intake with no notification target
        control_seconds = _intake_seconds(control, 150, domains)
        control.stop()
        node = make(True)
        _intake_seconds(node, 6, domains)  # six backlog_high events: one in flight, the rest queue
        wait_until(
            lambda: (
                node.metric("mxspool_notifications_total", target="hung", result="dropped") >= 3
            ),
            15,
            "the oldest notifications dropped",
        )
        seconds = _intake_seconds(node, 150, domains)
        assert seconds < control_seconds * 3 + 1.0, (seconds, control_seconds)
        assert node.metric("mxspool_notifications_total", target="hung", result="sent") == 0
        assert node.domain_status("d0.test")["held"] == 26
        assert "queue of hung is full" in node.log.read_text()
    finally:
        hung.close()


def test_notify_test_reports_each_target(
    spooler_factory: Any, receiver: Receiver, smtp_target: Target
) -> None:
    node: Spooler = spooler_factory()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    add_notify(
        node,
        {"name": "good-hook", "url": receiver.url, "secret": SECRET},
        {"name": "wrong-secret", "url": receiver.url, "secret": "not the receiver's"},
        {"name": "ops-mail", "to": [OPS], "relay": f"127.0.0.1:{smtp_target.port}", "tls": "off"},
        {"name": "dead-relay", "to": OPS, "relay": f"127.0.0.1:{dead_port}", "timeout": "2s"},
    )
    result = node.cli("notify", "test", "--json", check=False)
    assert result.returncode == 1, result.stderr
    rows = {row["target"]: row for row in json.loads(result.stdout)}
    assert rows["good-hook"]["ok"] and rows["good-hook"]["result"] == "HTTP 200"
    assert not rows["wrong-secret"]["ok"] and "HTTP 401" in rows["wrong-secret"]["result"]
    assert rows["ops-mail"]["ok"], rows["ops-mail"]
    assert not rows["dead-relay"]["ok"] and str(dead_port) in rows["dead-relay"]["result"]
    assert [r.signed for r in receiver.requests] == [True, False] or [
        r.signed for r in receiver.requests
    ] == [False, True]
    assert receiver.accepted("test")[0]["details"]["target"] == "good-hook"
    (mail,) = mails_to_ops(smtp_target)
    assert str(mail["Subject"]) == "[mxspool] test: mx.test.local"

    only = node.cli("notify", "test", "--target", "good-hook")
    assert only.stdout.startswith("OK ") and "good-hook" in only.stdout
    empty: Spooler = spooler_factory()
    none = empty.cli("notify", "test", check=False)
    assert none.returncode == 1 and "no [[notify]] targets" in none.stderr
