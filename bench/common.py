"""Helpers shared by the benchmarks: run ``mxspool serve``, sample RSS, drive smtp-source, tables.

Standard library only. Every server binds 127.0.0.1; every wait and loop is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
DOMAIN = "example.test"
SMTP_SOURCE = "/usr/sbin/smtp-source"
KIB = 1024
MIB = 1024 * 1024


class BenchError(RuntimeError):
    """A benchmark step failed (server would not start, a run lost messages, ...)."""


# -- ports ---------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(
    port: int, host: str = HOST, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None
) -> bool:
    """Wait (bounded) until ``host:port`` accepts connections; False on timeout or if ``proc``
    exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        if port_open(port, host):
            return True
        time.sleep(0.05)
    return False


# -- mxspool server ------------------------------------------------------------------------------


def mxspool_bin() -> str:
    """``$MXSPOOL_BIN``, else the repo's .venv, else ``mxspool`` on PATH."""
    env = os.environ.get("MXSPOOL_BIN")
    if env:
        return env
    venv = REPO / ".venv" / "bin" / "mxspool"
    if venv.exists():
        return str(venv)
    found = shutil.which("mxspool")
    if found:
        return found
    raise BenchError("mxspool executable not found (make a .venv or set MXSPOOL_BIN)")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def toml_value(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


class MxspoolServer:
    """``mxspool serve`` in a subprocess with a temporary TOML config.

    With the default SQLite store every instance gets a fresh spool in a new temporary directory,
    so a new instance is a wiped spool. With ``store_url`` (e.g. PostgreSQL) the store persists:
    ``setup_domain`` removes the benchmark domain (``--force``) and adds it again, and callers
    should compare held counts before and after a run.
    """

    def __init__(
        self,
        *,
        store_url: str | None = None,
        domain: str = DOMAIN,
        sink_port: int = 2526,
        hold: bool = True,
        port: int | None = None,
        admin_port: int | None = None,
        smtp_options: dict[str, str | int | bool] | None = None,
        extra_toml: str = "",
        workdir: Path | None = None,
        env: dict[str, str] | None = None,
        hostname: str = "bench.local",
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mxspool-bench-")
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self.store_url = store_url or f"sqlite:///{workdir / 'spool.db'}"
        self.domain = domain
        self.sink_port = sink_port
        self.hold = hold
        self.port = port or free_port()
        self.admin_port = admin_port or free_port()
        self.smtp_options = smtp_options or {}
        self.hostname = hostname  # nodes sharing a PostgreSQL spool need names of their own
        self.extra_toml = extra_toml
        self.env = env
        self.config = workdir / "mxspool.toml"
        self.log = workdir / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    def _write_config(self) -> None:
        self.config.write_text(
            "[smtp]\n"
            f'listen = ["{HOST}:{self.port}"]\n'
            f"hostname = {toml_value(self.hostname)}\n"
            + "".join(f"{k} = {toml_value(v)}\n" for k, v in self.smtp_options.items())
            + "\n[store]\n"
            f"url = {json.dumps(self.store_url)}\n"
            'min_free_space = "100MiB"\n'
            "\n[admin]\n"
            f'listen = "{HOST}:{self.admin_port}"\n' + self.extra_toml
        )

    @property
    def persistent_store(self) -> bool:
        return not self.store_url.startswith("sqlite:")

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError("mxspool is not running")
        return self.proc.pid

    def cli(
        self, *args: str, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = [mxspool_bin(), "--config", str(self.config), *args]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, check=False, env=self._env()
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{' '.join(args)} timed out after {timeout:.0f}s") from exc
        if check and proc.returncode != 0:
            raise BenchError(
                f"mxspool {' '.join(args)} failed ({proc.returncode}): "
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("MXSPOOL_CONFIG", None)
        if self.env:
            env.update(self.env)
        return env

    def setup_domain(self) -> None:
        if self.persistent_store:
            self.cli("domain", "remove", self.domain, "--force", check=False)
        args = ["domain", "add", self.domain, "--route", f"{HOST}:{self.sink_port}"]
        args += ["--tls", "off"]
        if self.hold:
            args.append("--hold")
        self.cli(*args)

    def start(self, timeout: float = 30.0, *, setup_domain: bool = True) -> None:
        """Set up the benchmark domain (unless ``setup_domain`` is false, e.g. for a second node
        on a shared store that another node has set up) and start ``mxspool serve``."""
        if self.proc is not None:
            raise BenchError("mxspool already started")
        if setup_domain:
            self.setup_domain()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [mxspool_bin(), "--config", str(self.config), "serve"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,
            )
        if not wait_port(self.port, timeout=timeout, proc=self.proc):
            rc = self.proc.poll()
            self.stop()
            raise BenchError(
                f"mxspool serve did not listen on {HOST}:{self.port} within {timeout:.0f}s "
                f"(exit code {rc})\n{tail(self.log)}"
            )

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, bounded wait, then SIGKILL. Returns the exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        return proc.returncode

    def status(self) -> dict[str, object]:
        out = self.cli("status", "--json").stdout
        try:
            data = json.loads(out)
        except json.JSONDecodeError as exc:
            raise BenchError(f"status --json printed no JSON: {out[:200]!r}") from exc
        if not isinstance(data, dict):
            raise BenchError(f"status --json: unexpected {out[:200]!r}")
        return data

    def held_count(self) -> int:
        domains = self.status().get("domains", [])
        if not isinstance(domains, list):
            raise BenchError("status --json: 'domains' is not a list")
        for entry in domains:
            if isinstance(entry, dict) and entry.get("domain") == self.domain:
                return int(entry.get("held", 0))
        return 0

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> MxspoolServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- memory --------------------------------------------------------------------------------------


def _status_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def descendants(pid: int) -> list[int]:
    """Child processes (recursively) from /proc/<pid>/task/*/children."""
    found: list[int] = []
    todo = [pid]
    while todo and len(found) < 10_000:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except (OSError, ValueError):
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


@dataclass
class RssSampler:
    """Samples VmRSS (and the kernel's VmHWM high-water mark) of ``pid`` in a thread.

    ``peak_rss_kib`` is the largest sampled VmRSS of the process itself; ``peak_tree_kib`` the
    largest sampled sum over it and its descendants; ``hwm_kib`` the last VmHWM read (the kernel's
    exact peak, which sampling can miss between samples).
    """

    pid: int
    interval: float = 0.05
    peak_rss_kib: int = 0
    peak_tree_kib: int = 0
    hwm_kib: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        own = _status_kib(self.pid)
        if not own:
            return
        rss = own.get("VmRSS", 0)
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        self.hwm_kib = max(self.hwm_kib, own.get("VmHWM", 0))
        tree = rss + sum(_status_kib(c).get("VmRSS", 0) for c in descendants(self.pid))
        self.peak_tree_kib = max(self.peak_tree_kib, tree)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> RssSampler:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> RssSampler:
        """Stop sampling (take one last sample first; call before the process exits)."""
        self.sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return self


# -- smtp-source ---------------------------------------------------------------------------------


@dataclass
class SourceResult:
    elapsed: float
    returncode: int | None
    output: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _meminfo_kib(field_name: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name == field_name:
                return int(rest.split()[0])
    return 0


def _idle_share(window: float) -> float:
    """The share of CPU time the machine spent idle over ``window`` seconds (/proc/stat)."""

    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, all

    idle0, total0 = read()
    time.sleep(window)
    idle1, total1 = read()
    return (idle1 - idle0) / max(1, total1 - total0)


SETTLE_TIMEOUT = 15.0
QUIET_IDLE = 0.8


def settle(timeout: float = SETTLE_TIMEOUT) -> float:
    """Let the machine finish the previous run's work before a timed run starts, so no system
    pays for the one before it (runs alternate): write out dirty pages (a Postfix run ends by
    deleting thousands of queue files, an mxspool run by deleting its spool), then wait,
    bounded, until the CPU is mostly idle. Returns the seconds waited."""
    start = time.monotonic()
    os.sync()
    deadline = start + timeout
    while time.monotonic() < deadline:
        dirty = _meminfo_kib("Dirty") + _meminfo_kib("Writeback")
        if dirty < 8 * 1024 and _idle_share(0.25) >= QUIET_IDLE:
            break
        os.sync()
    return time.monotonic() - start


def run_smtp_source(
    port: int,
    *,
    sessions: int,
    messages: int,
    size: int,
    persistent: bool = False,
    host: str = HOST,
    sender: str = "a@src.test",
    recipient: str = f"u@{DOMAIN}",
    helo: str = "client.test",
    timeout: float = 600.0,
    message_file: str | None = None,
) -> SourceResult:
    """Run Postfix's smtp-source once and time it (wall clock of the whole run).

    Without ``persistent`` smtp-source opens a new connection per message; with it (``-d``)
    each session keeps its connection open for all its messages. ``message_file``: send that
    pre-formatted message (``-F``) instead of a generated one of ``size`` bytes.
    """
    cmd = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages)]
    cmd += ["-F", message_file] if message_file else ["-l", str(size)]
    if persistent:
        cmd.append("-d")
    cmd += ["-f", sender, "-t", recipient, "-M", helo, f"{host}:{port}"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stderr if isinstance(exc.stderr, str) else (exc.stderr or b"").decode()
        return SourceResult(time.perf_counter() - start, None, out, timed_out=True)
    elapsed = time.perf_counter() - start
    return SourceResult(elapsed, proc.returncode, (proc.stdout + proc.stderr).strip())


# -- statistics and output -----------------------------------------------------------------------


def median(values: Iterable[float]) -> float | None:
    vals = list(values)
    return statistics.median(vals) if vals else None


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain markdown table, columns padded for terminals."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def machine_summary() -> str:
    """One line describing the machine, for the report header."""
    cpus = os.cpu_count() or 0
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            mem_kib = int(f.readline().split()[1])
        mem = f", {mem_kib // 1024 // 1024} GiB RAM"
    postfix = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["postconf", "-h", "mail_version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        postfix = f", Postfix {out.stdout.strip()}"
    return f"{cpus} CPUs{mem}{postfix}"
