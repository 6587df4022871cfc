"""Operator actions in the mail log: a message's discard, retry or bounce is a line under its
queue id, after its arrival, whether it came from the command line (a separate process
appending to the same file) or from the HTTP API (the server itself); domain-wide actions are
NOQUEUE lines naming their target. A command that cannot open the log still acts, and says
where the action was recorded instead."""

from __future__ import annotations

import getpass
import json
import smtplib
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Spooler
from tests.waiting import wait_until


def _node(spooler_factory: Any, log: Path, fmt: str = "text") -> Spooler:
    node: Spooler = spooler_factory()
    node.config.write_text(node.config.read_text() + f'[log]\nfile = "{log}"\nformat = "{fmt}"\n')
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--hold")
    return node


def _send(node: Spooler, count: int) -> list[str]:
    """``count`` messages over one session; their queue ids."""
    ids = []
    with smtplib.SMTP("127.0.0.1", node.port, timeout=30) as client:
        client.ehlo("client.example")
        for number in range(count):
            client.mail("sender@src.test")
            client.rcpt(f"u{number}@example.test")
            code, reply = client.data(b"Subject: x\r\n\r\nhi\r\n")
            assert code == 250
            ids.append(reply.decode().rsplit(" ", 1)[-1])
    return ids


def _lines(log: Path, queue_id: str, node: Spooler) -> list[str]:
    assert log.exists()
    return [line for line in node.cli("log", queue_id).stdout.splitlines() if line]


def test_cli_and_api_actions_are_lines_of_the_message(spooler_factory: Any, tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    node = _node(spooler_factory, log)
    node.start()
    by_cli, by_api, untouched = _send(node, 3)
    wait_until(lambda: log.exists() and by_api in log.read_text(), 10, "the arrival lines")

    node.cli("queue", "discard", by_cli)
    answer = httpx.post(
        f"http://127.0.0.1:{node.admin_port}/api/v1/messages/{by_api}/discard", json={}, timeout=10
    )
    assert answer.status_code == 200, answer.text

    lines = _lines(log, by_cli, node)
    assert [line.split(": ")[2] for line in lines] == ["queued", "queue.discard"]
    assert "mxspool/admin[" in lines[1]
    assert f"by={getpass.getuser()}" in lines[1]
    assert 'detail="recipients=1"' in lines[1] or "detail=recipients=1" in lines[1]

    def api_line() -> list[str]:  # the server writes it within ~0.1 s
        found = _lines(log, by_api, node)
        return found if len(found) == 2 else []

    lines = wait_until(api_line, 10, "the API's discard line")
    assert lines[1].split(": ")[2] == "queue.discard"
    # Positive control for "only its own lines": the untouched message has its arrival only.
    assert [line.split(": ")[2] for line in _lines(log, untouched, node)] == ["queued"]
    node.cli("domain", "hold", "example.test")
    text = log.read_text()
    assert "NOQUEUE: domain.hold: by=" in text and "target=example.test" in text


def test_json_lines_and_an_unwritable_log(spooler_factory: Any, tmp_path: Path) -> None:
    log = tmp_path / "mail.json"
    node = _node(spooler_factory, log, fmt="json")
    node.start()
    first, second = _send(node, 2)
    node.cli("queue", "discard", first)
    entries = [json.loads(line) for line in _lines(log, first, node)]
    assert [entry["event"] for entry in entries] == ["queued", "queue.discard"]
    assert entries[1]["component"] == "admin"
    assert entries[1]["by"] == getpass.getuser()
    node.stop()
    # The log's directory is gone: the command still acts, and says where the action went.
    broken = node.config.read_text().replace(str(log), str(tmp_path / "gone" / "mail.json"))
    node.config.write_text(broken)
    result = node.cli("queue", "discard", second)
    assert "in the audit log, not in the mail log" in result.stderr
    assert "cannot open the mail log" in result.stderr
    shown = json.loads(node.cli("queue", "show", second, "--json").stdout)
    assert {row["state"] for row in shown["recipients"]} == {"discarded"}
    # A read-only command says nothing about the log (nothing to record).
    assert node.cli("status").stderr == ""
