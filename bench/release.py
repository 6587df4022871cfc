"""Release throughput: N held 10 KiB messages released to Postfix's smtp-sink, mxspool vs Postfix.

Each run fills a fresh holding spool with smtp-source (10 sessions), checks that exactly N are
held, then releases and times until the last message is delivered (mxspool: every recipient
row ``delivered``; Postfix: ``postsuper -H ALL; postqueue -f`` until the queue is empty). Both
deliver to the same smtp-sink. The systems run alternately (A B A B ...); the table gives the
median rate of each and the ratio mxspool / Postfix.

Must run as root (Postfix). Needs .ci/install-postfix and an installed mxspool.

    python bench/release.py                        # 5,000 messages, 3 runs each
    python bench/release.py --messages 1000 --runs 1
    python bench/release.py --concurrency 20       # mxspool [delivery] concurrency
    python bench/release.py --busy 0.05            # the exchange-online backoff case

``--busy SHARE``: the exchange-online profile's backoff instead of the Postfix comparison.
mxspool releases to ``busy_sink.py`` (a stdlib sink that answers ``451 4.7.500 Server busy``
to SHARE of the MAIL, RCPT and DATA commands at random) and, alternately in the same run, to
the same sink answering none busy; the table gives the median rate of each and the ratio
busy / unthrottled, both until the last message is delivered and until 95% were (the sending
rate: the last few percent are the messages busy several times in a row, whose retries come
``exchange.busy_delay`` apart, a tail of about 2 s whatever N). The domain has ``--profile
exchange-online``, no rate (unpaced), and ``retry_schedule = ["1s"]`` in both, so no busy
retry waits longer than a second and the rate counts until every message is delivered. Each
message goes to its own recipient (smtp-source ``-N``), as the profile's per-recipient hourly
limit would hold one address back.
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from common import (
    DOMAIN,
    HOST,
    KIB,
    SMTP_SOURCE,
    BenchError,
    MxspoolServer,
    SourceResult,
    fmt,
    free_port,
    machine_summary,
    markdown_table,
    median,
    run_smtp_source,
    wait_port,
)
from postfix_spool import PostfixError, PostfixSpool

SMTP_SINK = "/usr/sbin/smtp-sink"


class Sink:
    """smtp-sink on 127.0.0.1:<port>, as POSTFIX-BASELINE.md runs it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Sink:
        self.proc = subprocess.Popen(
            [SMTP_SINK, "-u", "postfix", f"{HOST}:{self.port}", "1000"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not wait_port(self.port, proc=self.proc):
            raise BenchError(f"smtp-sink did not listen on {HOST}:{self.port}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


SENDING_SHARE = 0.95
"""``--busy`` also reports the rate until this share was delivered: the rest is the tail of
retries (a message busy on every try waits ``exchange.busy_delay`` between them), which at
5,000 messages is about half the run whatever the sending rate."""


def wait_until(check: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step)
    return False


def _count(db: Path, sql: str) -> int:
    # Read-only and outside the server: the status CLI would cost a Python start per poll.
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute(sql).fetchone()[0])
    except sqlite3.Error:
        return -1


def run_mxspool(
    messages: int, sink_port: int, concurrency: int, timeout: float, *, exo: bool = False
) -> float:
    """The release rate: ``messages`` / seconds until the last one is delivered."""
    return release_mxspool(messages, sink_port, concurrency, timeout, exo=exo)[0]


def release_mxspool(
    messages: int, sink_port: int, concurrency: int, timeout: float, *, exo: bool = False
) -> tuple[float, float]:
    """The release rate until the last message is delivered and until ``SENDING_SHARE`` of
    them were (the sending rate, without the tail of retries)."""
    extra = f"\n[delivery]\nconcurrency = {concurrency}\n"
    if exo:
        extra += 'retry_schedule = ["1s"]\n'
    with MxspoolServer(sink_port=sink_port, hold=True, extra_toml=extra) as server:
        db = Path(server.store_url.removeprefix("sqlite:///"))
        if exo:
            server.cli("domain", "route", DOMAIN, "--profile", "exchange-online")
            source = _fill_distinct(server.port, messages)
        else:
            source = run_smtp_source(server.port, sessions=10, messages=messages, size=10 * KIB)
        if not source.ok:
            raise BenchError(f"smtp-source into mxspool failed: {source.output[-500:]}")
        held_sql = "SELECT count(*) FROM recipients WHERE state = 'pending'"
        if not wait_until(lambda: _count(db, held_sql) == messages, 60):
            raise BenchError(f"mxspool holds {_count(db, held_sql)} messages, expected {messages}")
        done_sql = "SELECT count(*) FROM recipients WHERE state = 'delivered'"
        start = time.perf_counter()
        server.cli("domain", "release", DOMAIN)
        most = int(messages * SENDING_SHARE)
        if not wait_until(lambda: _count(db, done_sql) >= most, timeout):
            raise BenchError(f"mxspool delivered {_count(db, done_sql)} of {messages} in time")
        sending = most / (time.perf_counter() - start)
        if not wait_until(lambda: _count(db, done_sql) >= messages, timeout):
            raise BenchError(f"mxspool delivered {_count(db, done_sql)} of {messages} in time")
        return messages / (time.perf_counter() - start), sending


def _fill_distinct(port: int, messages: int) -> SourceResult:
    """smtp-source as ``run_smtp_source`` does, each message to its own recipient (-N)."""
    cmd = [SMTP_SOURCE, "-s", "10", "-m", str(messages), "-l", str(10 * KIB), "-N"]
    cmd += ["-f", "a@src.test", "-t", f"u@{DOMAIN}", "-M", "client.test", f"{HOST}:{port}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    output = (proc.stdout + proc.stderr).strip()
    return SourceResult(time.perf_counter() - start, proc.returncode, output)


class BusySink:
    """``busy_sink.py`` on 127.0.0.1:<port>, answering ``share`` of its commands busy."""

    def __init__(self, port: int, share: float, seed: int) -> None:
        self.port, self.share, self.seed = port, share, seed
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> BusySink:
        script = Path(__file__).with_name("busy_sink.py")
        args = ["--port", str(self.port), "--busy", str(self.share), "--seed", str(self.seed)]
        self.proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not wait_port(self.port, proc=self.proc):
            raise BenchError(f"busy_sink.py did not listen on {HOST}:{self.port}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def main_busy(args: argparse.Namespace) -> int:
    """The exchange-online backoff case: busy vs unthrottled, alternately, medians."""
    cases = {"unthrottled": 0.0, f"{args.busy:.0%} busy": args.busy}
    rates: dict[str, list[float]] = {name: [] for name in cases}
    sending: dict[str, list[float]] = {name: [] for name in cases}
    errors: list[str] = []
    print(
        f"# exchange-online release of {args.messages:,} held 10 KiB messages to busy_sink.py, "
        f"unpaced ({machine_summary()})"
    )
    for run in range(args.runs):
        for name, share in cases.items():
            sink_port = free_port()
            try:
                with BusySink(sink_port, share, seed=run + 1):
                    rate, most = release_mxspool(
                        args.messages, sink_port, args.concurrency, args.timeout, exo=True
                    )
            except BenchError as exc:
                errors.append(f"run {run + 1} {name}: {exc}")
                print(f"run {run + 1} {name}: ERROR {exc}", file=sys.stderr)
                continue
            rates[name].append(rate)
            sending[name].append(most)
            print(
                f"run {run + 1} {name}: {rate:,.0f} msgs/s ({most:,.0f} until {SENDING_SHARE:.0%})",
                flush=True,
            )
    rows = []
    for label, table in (("all delivered", rates), (f"{SENDING_SHARE:.0%} delivered", sending)):
        healthy, busy = (median(table[name]) for name in cases)
        ratio = f"{busy / healthy:.2f}" if healthy and busy else "n/a"
        job = f"exchange-online release of {args.messages:,}, until {label}"
        rows.append([job, fmt(healthy), fmt(busy), ratio])
    print()
    print(
        markdown_table(
            ["job", "unthrottled msgs/s", f"{args.busy:.0%} busy msgs/s", "busy / unthrottled"],
            rows,
        )
    )
    print(f"(median of {args.runs} runs each; runs: {rates}; until {SENDING_SHARE:.0%}: {sending})")
    return 1 if errors else 0


def run_postfix(messages: int, sink_port: int, timeout: float) -> float:
    port = free_port()
    with PostfixSpool(port=port, sink_port=sink_port) as spool:
        source = run_smtp_source(port, sessions=10, messages=messages, size=10 * KIB)
        if not source.ok:
            raise BenchError(f"smtp-source into Postfix failed: {source.output[-500:]}")
        if not wait_until(lambda: spool.held_count() == messages, 120, step=0.5):
            raise BenchError(f"Postfix holds {spool.held_count()} messages, expected {messages}")
        start = time.perf_counter()
        spool.release()
        if not spool.wait_queue_empty(timeout):
            raise BenchError(f"Postfix still has {spool.total_count()} queued after {timeout}s")
        return messages / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Release throughput, mxspool vs Postfix")
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3, help="runs per system")
    parser.add_argument("--concurrency", type=int, default=10, help="mxspool connections")
    parser.add_argument("--systems", default="mxspool,postfix", help="comma list")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--busy",
        type=float,
        default=None,
        metavar="SHARE",
        help="exchange-online backoff case: SHARE of commands busy vs none (e.g. 0.05)",
    )
    args = parser.parse_args(argv)
    if args.busy is not None:
        return main_busy(args)
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    rates: dict[str, list[float]] = {name: [] for name in systems}
    errors: list[str] = []
    print(f"# release of {args.messages:,} held 10 KiB messages to smtp-sink ({machine_summary()})")
    for run in range(args.runs):
        for name in systems:
            sink_port = free_port()
            try:
                with Sink(sink_port):
                    if name == "mxspool":
                        rate = run_mxspool(args.messages, sink_port, args.concurrency, args.timeout)
                    else:
                        rate = run_postfix(args.messages, sink_port, args.timeout)
            except (BenchError, PostfixError) as exc:
                errors.append(f"run {run + 1} {name}: {exc}")
                print(f"run {run + 1} {name}: ERROR {exc}", file=sys.stderr)
                continue
            rates[name].append(rate)
            print(f"run {run + 1} {name}: {rate:,.0f} msgs/s", flush=True)
    mx, pf = median(rates.get("mxspool", [])), median(rates.get("postfix", []))
    ratio = f"{mx / pf:.2f}x" if mx and pf else "n/a"
    print()
    print(
        markdown_table(
            ["job", "mxspool msgs/s", "Postfix msgs/s", "mxspool / Postfix"],
            [[f"release {args.messages:,} x 10 KiB to smtp-sink", fmt(mx), fmt(pf), ratio]],
        )
    )
    print(f"(median of {args.runs} runs each; runs: {rates})")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
