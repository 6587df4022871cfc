"""The systemd unit (checked by ``systemd-analyze verify``) and the notify protocol, spoken by a
real ``mxspool serve`` to a unix datagram socket the test owns."""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mxspool import sdnotify
from tests.conftest import MXSPOOL, Spooler
from tests.waiting import stays, wait_until

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "mxspool.service"
SYSUSERS = Path(__file__).resolve().parent.parent / "deploy" / "mxspool.sysusers.conf"
ANALYZE = shutil.which("systemd-analyze")


# -- the unit file ---------------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    """``Key`` -> values (every occurrence) of the unit's [Service] section."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=unit.parent,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze missing (apt-get install systemd)")
def test_the_unit_verifies(tmp_path: Path) -> None:
    # The shipped ExecStart (/opt/mxspool/bin/mxspool) does not exist here: verify a copy that
    # runs this venv's mxspool, everything else unchanged.
    text = UNIT.read_text()
    assert "ExecStart=/opt/mxspool/bin/mxspool " in text
    copy = tmp_path / "mxspool.service"
    copy.write_text(text.replace("/opt/mxspool/bin/mxspool", MXSPOOL))
    result = verify(copy)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr

    # Positive control: the same check reports a misspelt key and a missing program.
    broken = tmp_path / "broken.service"
    broken.write_text(text.replace("ProtectHome=", "ProtectHomme="))
    result = verify(broken)
    assert "ProtectHomme" in result.stderr
    if not Path("/opt/mxspool/bin/mxspool").exists():
        assert "not executable" in verify(UNIT).stderr  # the shipped path, missing here


def test_the_unit_asks_for_what_the_brief_needs() -> None:
    settings = unit_settings()
    expected = {
        "Type": "notify",
        "User": "mxspool",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "StateDirectory": "mxspool",
        "ConfigurationDirectory": "mxspool",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
        "MemoryDenyWriteExecute": "yes",
    }
    for key, value in expected.items():
        assert value in settings.get(key, []), f"{key}={value} missing"
    assert "@system-service" in settings["SystemCallFilter"]
    assert int(settings["LimitNOFILE"][0]) >= 4096
    assert "WatchdogSec" in settings
    # The user comes from the sysusers.d file shipped beside the unit.
    assert re.search(r"^u mxspool ", SYSUSERS.read_text(), re.MULTILINE)


# -- the notify protocol against a real server -------------------------------------------------


class NotifySocket:
    """The service manager's end: a unix datagram socket in the abstract namespace."""

    def __init__(self) -> None:
        self.name = f"mxspool-test-{secrets.token_hex(8)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.messages: list[tuple[float, dict[str, str]]] = []

    @property
    def env(self) -> str:
        return "@" + self.name

    def poll(self) -> list[dict[str, str]]:
        """Everything received so far (reads what is waiting, never blocks)."""
        while True:
            try:
                data = self.sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))
        return [fields for _at, fields in self.messages]

    def first(self, key: str, within: float = 20.0) -> dict[str, str]:
        def found() -> dict[str, str] | None:
            return next((m for m in self.poll() if key in m), None)

        return wait_until(found, within, f"{key} on the notify socket")

    def count(self, key: str) -> int:
        return sum(1 for m in self.poll() if key in m)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def start_serve(
    node: Spooler, env: dict[str, str], preexec: object = None, pid_in_env: bool = False
) -> subprocess.Popen[bytes]:
    """`mxspool serve` without waiting for anything (the test waits for READY=1 instead).
    With ``pid_in_env`` it runs through ``sh -c 'WATCHDOG_PID=$$ exec ...'`` so WATCHDOG_PID is
    the server's own pid, as systemd sets it."""
    argv = [MXSPOOL, "--config", str(node.config), "serve"]
    if pid_in_env:
        argv = ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *argv]
    node.proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=node.log.open("ab"),
        env={**os.environ, **env},
        preexec_fn=preexec,  # type: ignore[arg-type]  # noqa: PLW1509
    )
    return node.proc


def banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        return sock.recv(100)


def test_ready_watchdog_stopping(spooler_factory: object, notify_socket: NotifySocket) -> None:
    node: Spooler = spooler_factory()  # type: ignore[operator]
    env = {"NOTIFY_SOCKET": notify_socket.env, "WATCHDOG_USEC": "200000"}  # ping every 0.1 s
    proc = start_serve(node, env, pid_in_env=True)

    ready = notify_socket.first("READY")
    # READY=1 means port 25 accepts: a connection made right after it gets the greeting.
    assert banner(node.port).startswith(b"220 ")
    assert ready["READY"] == "1"
    assert f"127.0.0.1:{node.port}" in ready.get("STATUS", "")
    assert not any("STOPPING" in m for m in notify_socket.poll())

    # The watchdog keeps pinging while the node runs.
    start = notify_socket.count("WATCHDOG")
    wait_until(lambda: notify_socket.count("WATCHDOG") >= start + 5, 15, "5 more WATCHDOG=1")
    assert proc.poll() is None

    proc.send_signal(signal.SIGTERM)
    stopping = notify_socket.first("STOPPING")
    assert stopping["STOPPING"] == "1"
    assert proc.wait(timeout=15) == 0
    # STOPPING=1 came after READY=1, once.
    keys = [next(iter(m)) for m in notify_socket.poll() if "READY" in m or "STOPPING" in m]
    assert keys == ["READY", "STOPPING"]


def test_no_watchdog_for_another_pid(spooler_factory: object, notify_socket: NotifySocket) -> None:
    # WATCHDOG_PID names another process: the node must not ping for it. READY=1 on the same
    # socket is the positive control that the node does talk to it (and test_ready_... shows
    # that with a matching pid it pings every 0.1 s).
    node: Spooler = spooler_factory()  # type: ignore[operator]
    env = {"NOTIFY_SOCKET": notify_socket.env, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    proc = start_serve(node, env)
    notify_socket.first("READY")
    stays(lambda: notify_socket.count("WATCHDOG") == 0, 1.0, "no WATCHDOG=1")
    proc.send_signal(signal.SIGTERM)
    notify_socket.first("STOPPING")
    assert proc.wait(timeout=15) == 0


def test_a_failed_start_says_why_in_status(
    spooler_factory: object, notify_socket: NotifySocket
) -> None:
    node: Spooler = spooler_factory()  # type: ignore[operator]
    with socket.socket() as taken:  # the SMTP port is in use: the node cannot start
        taken.bind(("127.0.0.1", node.port))
        taken.listen()
        proc = start_serve(node, {"NOTIFY_SOCKET": notify_socket.env})
        assert proc.wait(timeout=30) == 1
    wait_until(
        lambda: any("cannot listen" in m.get("STATUS", "") for m in notify_socket.poll()),
        10,
        "STATUS= with the reason",
    )
    assert notify_socket.count("READY") == 0


# -- MemoryDenyWriteExecute= with the C extensions ---------------------------------------------

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def deny_write_execute() -> None:
    """What MemoryDenyWriteExecute=yes does, by the kernel's own switch (Linux 6.3+)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")


def mdwe_supported() -> bool:
    probe = subprocess.run(
        ["/bin/true"], preexec_fn=deny_write_execute, check=False, capture_output=True
    )
    return probe.returncode == 0


@pytest.mark.skipif(not mdwe_supported(), reason="kernel without PR_SET_MDWE (Linux < 6.3)")
def test_memory_deny_write_execute_fits(
    spooler_factory: object, notify_socket: NotifySocket, tmp_path: Path
) -> None:
    # The node runs with W^X memory enforced: uvloop, the C scanner and group commit, TLS
    # (STARTTLS with a real certificate) and a message stored and counted.
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("mx.test.local", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    node: Spooler = spooler_factory(  # type: ignore[operator]
        smtp={"tls_cert": str(tmp_path / "cert.pem"), "tls_key": str(tmp_path / "key.pem")}
    )
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:2526", "--hold")
    proc = start_serve(node, {"NOTIFY_SOCKET": notify_socket.env}, preexec=deny_write_execute)
    notify_socket.first("READY")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with smtplib.SMTP("127.0.0.1", node.port, timeout=10) as client:
        client.starttls(context=context)
        client.sendmail("a@src.test", ["b@example.test"], b"Subject: w^x\r\n\r\nbody\r\n")
    wait_until(lambda: node.domain_status("example.test")["held"] == 1, 15, "the message held")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert "uvloop" in node.log.read_text()


# -- the module on its own ---------------------------------------------------------------------


def test_notifier_sends_to_a_path_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        notifier = sdnotify.Notifier.from_environ({"NOTIFY_SOCKET": str(path)})
        assert notifier.ready("line one\nline two")
        assert server.recv(100) == b"READY=1\nSTATUS=line one line two"
        assert notifier.status("x" * 1000)
        assert server.recv(2000) == b"STATUS=" + b"x" * sdnotify.MAX_STATUS
        notifier.close()


def test_notifier_is_a_no_op_without_a_socket(tmp_path: Path) -> None:
    assert not sdnotify.Notifier.from_environ({}).ready()
    assert not sdnotify.Notifier("relative/path").enabled
    # A socket nobody listens on: the send fails quietly, the node carries on.
    gone = sdnotify.Notifier(str(tmp_path / "nobody"))
    assert gone.enabled and not gone.watchdog() and not gone.stopping()


def test_watchdog_interval() -> None:
    me = str(os.getpid())
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    for bad in ("", "0", "-5", "soon"):
        assert sdnotify.watchdog_interval({"WATCHDOG_USEC": bad}) is None
