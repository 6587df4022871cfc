"""Crash points for `mxspool serve`: load it over SMTP, crash it at a sync, cut the power, check.

One chain = one spool directory that lives through many crash points in turn: each point
starts `mxspool serve` (forked by zygote.py under the shim) on what the previous cut left,
sends mail from several SMTP clients until the shim kills the server at sync point N, cuts
the power (powercut.py), and checks the spool (check.py) against everything any client of
the chain was ever told "250 queued as": acknowledged mail must survive every later cut too.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import Spooler
from tests.powerloss import check, powercut
from tests.smtp_client import RawClient

HERE = Path(__file__).parent
CLIENTS = 4
# How long one point may load the server before the harness gives up on reaching its sync
# point and kills it itself (a power cut at an arbitrary moment, still checked).
POINT_SECONDS = 8.0


def wait_listening(port: int, pid: int, timeout: float = 20.0) -> bool:
    """Whether the server forked as pid listens on port before timeout (False: it died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return True
        except OSError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            time.sleep(0.01)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def build_shim(out_dir: Path) -> Path:
    """Compile shim.c into out_dir (once per test session)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "powerloss_shim.so"
    source = HERE / "shim.c"
    if not target.exists() or target.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(
            [
                "gcc",
                "-shared",
                "-fPIC",
                "-O2",
                "-Wall",
                "-Werror",
                "-o",
                str(target),
                str(source),
                "-ldl",
                "-lpthread",
            ],
            check=True,
            capture_output=True,
        )
    return target


def make_template(root: Path) -> Path:
    """A spool with example.test held, for chains to start from (copied: quicker than the
    CLI each time)."""
    root.mkdir(parents=True)
    node = Spooler(root)
    node.cli("domain", "add", "example.test", "--route", "127.0.0.1:9", "--tls", "off", "--hold")
    return node.db.parent


class Zygote:
    """zygote.py under the shim: forks `mxspool serve` children on request."""

    def __init__(self, shim: Path, groupcommit: Path | None = None) -> None:
        env = {**os.environ, "LD_PRELOAD": str(shim)}
        env.pop("MXSPOOL_POWERLOSS_DIR", None)
        extra = [str(groupcommit)] if groupcommit is not None else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.powerloss.zygote", str(shim), *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=HERE.parent.parent,
            text=True,
        )

    def spawn(self, request: dict[str, Any]) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        return int(answer["pid"])

    def wait(self, pid: int) -> int:
        """The child's exit status (-signal when killed); it must have exited or be dying."""
        assert self.proc.stdout is not None
        answer = json.loads(self.proc.stdout.readline())
        assert answer["pid"] == pid, answer
        return int(answer["status"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Sent:
    tag: str
    recipients: list[str]
    body: bytes
    queue_id: str | None = None  # set when the client got its 250


@dataclass
class Ledger:
    """Every message any client of the chain handed over, by tag."""

    sent: dict[str, Sent] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def acknowledged(self) -> dict[str, Sent]:
        with self.lock:
            return {s.queue_id: s for s in self.sent.values() if s.queue_id is not None}


def message(tag: str, size: int) -> bytes:
    line = (tag + " ").encode() * 12
    body = (line[:90] + b"\r\n") * (size // 92 + 1)
    return f"Message-ID: <{tag}@powerloss.test>\r\nSubject: {tag}\r\n\r\n".encode() + body


def client_loop(
    port: int,
    ledger: Ledger,
    prefix: str,
    sizes: list[int],
    rng: random.Random,
    stop: threading.Event,
    deadline: float,
) -> None:
    """Send until the server goes away; every 250 goes into the ledger."""
    n = 0
    try:
        client = RawClient(port, timeout=10)
        client.reply()
        client.command(f"EHLO {prefix}")
        while not stop.is_set() and time.monotonic() < deadline:
            tag = f"{prefix}m{n}"
            n += 1
            recipients = [f"u{k}@example.test" for k in rng.sample(range(9), rng.randint(1, 3))]
            item = Sent(tag, recipients, message(tag, rng.choice(sizes)))
            rcpts = "".join(f"RCPT TO:<{r}>\r\n" for r in recipients)
            client.send(f"MAIL FROM:<{tag}@src.test>\r\n{rcpts}DATA\r\n".encode())
            codes = [code for code, _ in client.replies(len(recipients) + 2)]
            if codes != [250] * (len(recipients) + 1) + [354]:
                break
            with ledger.lock:
                ledger.sent[tag] = item
            client.send(item.body + b".\r\n")
            code, text = client.reply()
            if code != 250:
                break
            with ledger.lock:
                item.queue_id = text.rsplit(" ", 1)[-1]
        client.close()
    except OSError:
        pass  # the server died: the point of the exercise


@dataclass
class PointResult:
    crash_at: int
    crashed: bool  # the shim crashed it at crash_at (else: the harness killed it)
    sync_points: int
    acknowledged: int
    cut: powercut.CutReport
    shm: str
    problems: list[str]


@dataclass
class Chain:
    """One spool and its history across crash points (see the module docstring)."""

    root: Path
    zygote: Zygote
    python_writer: bool
    sizes: list[int]
    seed: int
    smtp: dict[str, Any] = field(default_factory=dict)
    pragmas: list[str] | None = None
    ledger: Ledger = field(default_factory=Ledger)
    points: int = 0

    template: Path | None = None

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.node = Spooler(self.root, smtp=self.smtp)
        self.data = self.node.db.parent
        if self.template is not None:
            shutil.copytree(self.template, self.data)
        else:
            self.node.cli(
                "domain", "add", "example.test", "--route", "127.0.0.1:9", "--tls", "off", "--hold"
            )

    def request(self, crash_at: int, log: Path) -> dict[str, Any]:
        return {
            "config": str(self.node.config),
            "dir": str(self.data.resolve()),
            "log": str(log),
            "crash_at": crash_at,
            "stderr": str(self.node.log),
            "python_writer": self.python_writer,
            "pragmas": self.pragmas,
        }

    def run_point(
        self, crash_at: int, keep: float = 0.5, seconds: float = POINT_SECONDS, cut: bool = True
    ) -> PointResult:
        """Load the server until the shim crashes it at sync point crash_at (0: never; the
        harness then kills it after ``seconds``), cut the power (unless not ``cut``: then it
        is only a kill -9), check the spool."""
        index = self.points
        self.points += 1
        log = self.root / "powerloss.log"
        pid = self.zygote.spawn(self.request(crash_at, log))
        status: int | None = None
        if not wait_listening(self.node.port, pid):
            # Dead before it listened: crashed at a sync point during start-up (or failed).
            status = self.zygote.wait(pid)
        rng = random.Random(f"{self.seed}:{index}")
        stop = threading.Event()
        deadline = time.monotonic() + seconds
        threads = [
            threading.Thread(
                target=client_loop,
                args=(
                    self.node.port,
                    self.ledger,
                    f"p{index}c{c}",
                    self.sizes,
                    random.Random(rng.random()),
                    stop,
                    deadline + 1,
                ),
            )
            for c in range(CLIENTS if status is None else 0)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if status is None:
            if any(thread.is_alive() for thread in threads):
                os.kill(pid, signal.SIGKILL)  # never reached its sync point
            status = self.zygote.wait(pid)
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
        record = powercut.read_log(log)
        crashed = record.crashed_at is not None
        if crashed or status == -signal.SIGKILL:
            # Keep the page-cache state so that a failure can be replayed with the same seed.
            snapshot = self.root / "before-cut"
            shutil.rmtree(snapshot, ignore_errors=True)
            shutil.copytree(self.data, snapshot, ignore=shutil.ignore_patterns("tmp"))
            shutil.copy(log, snapshot / "powerloss.log")
        report = powercut.CutReport()
        shm = "kept"
        if cut:
            report = powercut.cut_power(record, rng, keep=keep)
            shm = powercut.scramble_shm(self.node.db, rng)
        problems = []
        if status not in (-signal.SIGKILL, 0):
            problems.append(f"serve exited with status {status} (see {self.node.log})")
        problems += check.check_spool(self.node.db, self.ledger.sent, self.ledger.acknowledged())
        return PointResult(
            crash_at,
            crashed,
            record.sync_points,
            len(self.ledger.acknowledged()),
            report,
            shm,
            problems,
        )

    def accepts_mail(self) -> bool:
        """A last serve on the spool (no shim crash) takes a message and says 250."""
        log = self.root / "final.log"
        pid = self.zygote.spawn(self.request(0, log))
        try:
            assert wait_listening(self.node.port, pid), f"serve died; see {self.node.log}"
            client = RawClient(self.node.port, timeout=10)
            client.reply()
            client.command("EHLO final")
            client.command("MAIL FROM:<final@src.test>")
            client.command("RCPT TO:<u1@example.test>")
            client.command("DATA")
            code, _ = client.command(message("final", 500) + b".")
            client.command("QUIT")
            client.close()
            return code == 250
        finally:
            os.kill(pid, signal.SIGTERM)
            self.zygote.wait(pid)


# The negative control's mutation of _coalesce.c: sync first, write the buffer afterwards, so
# a commit is acknowledged while its last frames are only in the page cache.
_MUTATION = (
    "    int rc = flush((CoalescingFile *)file);\n"
    "    return rc != SQLITE_OK ? rc : REAL(file)->pMethods->xSync(REAL(file), flags);\n",
    "    int rc = REAL(file)->pMethods->xSync(REAL(file), flags);\n"
    "    int rc2 = flush((CoalescingFile *)file);\n"
    "    return rc != SQLITE_OK ? rc : rc2;\n",
)


def build_mutant_groupcommit(out_dir: Path) -> Path:
    """mxspool.store._groupcommit with the coalescing VFS's xSync flushing after the sync."""
    import sysconfig

    store = HERE.parent.parent / "src" / "mxspool" / "store"
    out_dir.mkdir(parents=True, exist_ok=True)
    source = (store / "_coalesce.c").read_text()
    # The first flush-then-call after c_sync's name is c_sync's own body.
    body_at = source.index(_MUTATION[0], source.index("\nc_sync("))
    mutant = source[:body_at] + _MUTATION[1] + source[body_at + len(_MUTATION[0]) :]
    (out_dir / "_coalesce.c").write_text(mutant)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = out_dir / f"_groupcommit{suffix}"
    subprocess.run(
        [
            "gcc",
            "-shared",
            "-fPIC",
            "-O2",
            f"-I{sysconfig.get_paths()['include']}",
            f"-I{store}",
            "-o",
            str(target),
            str(store / "_groupcommit.c"),
            str(out_dir / "_coalesce.c"),
            "-lsqlite3",
            "-lcrypto",
        ],
        check=True,
        capture_output=True,
    )
    return target
