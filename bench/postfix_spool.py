"""Postfix configured as a holding spooler: the yardstick for mxspool's benchmarks.

Configures the system Postfix (installed by ``.ci/install-postfix``) exactly as
POSTFIX-BASELINE.md describes: smtpd on 127.0.0.1:<port> only, mail for
``example.test`` accepted and put on HOLD by ``check_recipient_access``, routed (on release) to
``smtp:[127.0.0.1]:<sink_port>``, chroot off, log in /tmp.

Every (re)configuration starts from pristine copies of main.cf and master.cf saved on first use
(``*.mxspool-bench-orig``), so it can be repeated any number of times with different ports.
``restore`` puts the originals back. Nothing is left running: use the context manager or call
``stop()``.

Must run as root. Command line::

    python bench/postfix_spool.py start [--port 2525] [--sink-port 2526]
    python bench/postfix_spool.py count | flush | release | status | stop | restore
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

POSTFIX_DIR = Path("/etc/postfix")
BACKUP_SUFFIX = ".mxspool-bench-orig"
QUEUE_NAMES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")


class PostfixError(RuntimeError):
    """Postfix could not be configured, started or queried."""


def _run(
    args: list[str], *, timeout: float = 60.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise PostfixError(f"{args[0]} not found; run .ci/install-postfix") from exc
    except subprocess.TimeoutExpired as exc:
        raise PostfixError(f"{' '.join(args)} timed out after {timeout:.0f}s") from exc
    if check and proc.returncode != 0:
        raise PostfixError(
            f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout}"
        )
    return proc


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def postfix_check_output() -> str:
    """``postfix check`` only logs to syslog; ``script`` gives it a tty so errors show."""
    try:
        proc = subprocess.run(
            ["script", "-qc", "postfix check", "/dev/null"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(postfix check could not run: {exc})"
    return (proc.stdout + proc.stderr).strip() or "(postfix check: no complaints)"


def strip_smtp_inet(master_cf: str) -> str:
    """Remove the default ``smtp inet ... smtpd`` service and its ``-o`` continuation lines."""
    out: list[str] = []
    skipping = False
    for line in master_cf.splitlines():
        if re.match(r"^smtp\s+inet\s", line):
            skipping = True
            continue
        if skipping and line[:1] in (" ", "\t") and line.strip():
            continue
        skipping = False
        out.append(line)
    return "\n".join(out) + "\n"


@dataclass
class PostfixSpool:
    port: int = 2525
    sink_port: int = 2526
    domain: str = "example.test"
    host: str = "127.0.0.1"
    maillog: str = "/tmp/postfix-bench.log"
    config_dir: Path = POSTFIX_DIR

    # -- configuration -------------------------------------------------------------------------

    def _pristine(self, name: str) -> Path:
        live = self.config_dir / name
        backup = self.config_dir / (name + BACKUP_SUFFIX)
        if not backup.exists():
            if not live.exists():
                raise PostfixError(f"{live} missing; run .ci/install-postfix")
            shutil.copy2(live, backup)
        return backup

    def configure(self) -> None:
        """(Re)write main.cf and master.cf from the pristine copies. Stops Postfix first."""
        self.stop()
        for name in ("main.cf", "master.cf"):
            shutil.copy2(self._pristine(name), self.config_dir / name)
        Path(self.maillog).unlink(missing_ok=True)  # one log per configuration, not unbounded
        main = [
            f"inet_interfaces = {self.host}",
            "inet_protocols = ipv4",
            "mydestination = localhost",
            "mynetworks = 127.0.0.0/8",
            f"relay_domains = {self.domain}",
            "relay_transport = smtp",
            "default_transport = smtp",
            "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
            "smtpd_recipient_restrictions = check_recipient_access"
            f" inline:{{ {self.domain}=HOLD }}, permit_mynetworks, reject_unauth_destination",
            f"transport_maps = inline:{{ {self.domain}=smtp:[127.0.0.1]:{self.sink_port} }}",
            "smtpd_peername_lookup = no",
            "smtp_dns_support_level = disabled",
            "smtp_host_lookup = native",
            "message_size_limit = 157286400",
            "maillog_file_prefixes = /var, /dev/stdout, /tmp",
            f"maillog_file = {self.maillog}",
        ]
        _run(["postconf", "-c", str(self.config_dir), "-e", *main])
        master = self.config_dir / "master.cf"
        text = strip_smtp_inet(master.read_text())
        text += f"{self.host}:{self.port} inet n - n - - smtpd\n"
        master.write_text(text)
        _run(["postconf", "-c", str(self.config_dir), "-F", "*/*/chroot = n"])

    def restore(self) -> None:
        """Stop Postfix and put the original main.cf/master.cf back."""
        self.stop()
        for name in ("main.cf", "master.cf"):
            backup = self.config_dir / (name + BACKUP_SUFFIX)
            if backup.exists():
                shutil.copy2(backup, self.config_dir / name)

    # -- lifecycle -----------------------------------------------------------------------------

    def running(self) -> bool:
        return _run(["postfix", "status"], check=False).returncode == 0

    def start(self, *, flush: bool = True, wait: float = 30.0) -> None:
        """Start Postfix (configure first) and wait until smtpd answers on the port."""
        if self.running():
            raise PostfixError("postfix is already running; stop it first")
        if port_open(self.host, self.port):
            raise PostfixError(f"{self.host}:{self.port} is already in use")
        proc = _run(["postfix", "start"], check=False)
        if proc.returncode != 0:
            raise PostfixError(
                f"postfix start failed: {proc.stderr.strip()}\n{postfix_check_output()}"
            )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if port_open(self.host, self.port):
                if flush:
                    # After start: a never-started Postfix has no hold/ directory yet.
                    self.flush()
                return
            time.sleep(0.1)
        diag = postfix_check_output()
        self.stop()
        raise PostfixError(
            f"postfix did not listen on {self.host}:{self.port} within {wait:.0f}s\n"
            f"{diag}\n{self.log_tail()}"
        )

    def stop(self, wait: float = 30.0) -> None:
        """``postfix stop`` (errors ignored) and wait, bounded, for the master to exit."""
        if shutil.which("postfix") is None:
            return
        _run(["postfix", "stop"], check=False)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and self.running():
            time.sleep(0.1)
        if self.running():
            _run(["postfix", "abort"], check=False)

    def __enter__(self) -> PostfixSpool:
        self.configure()
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- queue ---------------------------------------------------------------------------------

    def queue_directory(self) -> Path:
        out = _run(["postconf", "-c", str(self.config_dir), "-h", "queue_directory"])
        return Path(out.stdout.strip())

    def queue_counts(self) -> dict[str, int]:
        """Messages per queue. ``postqueue -j`` while running, else counts queue files."""
        counts = dict.fromkeys(QUEUE_NAMES, 0)
        if self.running():
            proc = _run(["postqueue", "-j"], timeout=120)
            for line in proc.stdout.splitlines():
                if line.strip():
                    name = json.loads(line).get("queue_name", "?")
                    counts[name] = counts.get(name, 0) + 1
            return counts
        return self.queue_file_counts()

    def queue_file_counts(self) -> dict[str, int]:
        """Messages per queue by counting queue files (cheap; works running or stopped)."""
        counts = dict.fromkeys(QUEUE_NAMES, 0)
        qdir = self.queue_directory()
        for name in QUEUE_NAMES:
            d = qdir / name
            if d.is_dir():
                counts[name] = sum(1 for p in d.rglob("*") if p.is_file())
        return counts

    def held_count(self) -> int:
        return self.queue_counts()["hold"]

    def total_count(self) -> int:
        return sum(self.queue_counts().values())

    def flush(self) -> None:
        """Delete every queued message (all queues) for a clean start."""
        if not self.running() and not (self.queue_directory() / "hold").is_dir():
            return  # never started: queue directories not created yet, so nothing queued
        _run(["postsuper", "-d", "ALL"], timeout=300)

    def release(self) -> None:
        """Release everything on hold and ask for immediate delivery."""
        _run(["postsuper", "-H", "ALL"], timeout=300)
        _run(["postqueue", "-f"], check=False)

    def wait_queue_empty(self, timeout: float = 300.0) -> bool:
        """Poll (cheaply, by queue files) until every queue is empty; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(self.queue_file_counts().values()) == 0:
                return True
            time.sleep(0.2)
        return False

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = Path(self.maillog).read_text(errors="replace")
        except OSError:
            return "(no maillog)"
        return "\n".join(text.splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "action",
        choices=["configure", "start", "stop", "status", "count", "flush", "release", "restore"],
    )
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--sink-port", type=int, default=2526)
    parser.add_argument("--domain", default="example.test")
    args = parser.parse_args(argv)
    spool = PostfixSpool(port=args.port, sink_port=args.sink_port, domain=args.domain)
    try:
        if args.action == "configure":
            spool.configure()
        elif args.action == "start":
            spool.configure()
            spool.start()
            print(f"postfix holding {args.domain} on 127.0.0.1:{args.port}")
        elif args.action == "stop":
            spool.stop()
        elif args.action == "status":
            print("running" if spool.running() else "stopped")
        elif args.action == "count":
            print(json.dumps(spool.queue_counts()))
        elif args.action == "flush":
            spool.flush()
        elif args.action == "release":
            spool.release()
        elif args.action == "restore":
            spool.restore()
    except PostfixError as exc:
        print(f"postfix_spool: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
