"""Scale: N held messages, then how long the operator's views take and what a release costs.

Fills one store with N held 1 KiB messages through SMTP (Postfix's smtp-source, one recipient
each, ``--sessions`` connections kept open with ``-d``), then times, each ``--repeat`` times
(median; the first call is a warm-up and not counted):

- ``status --json`` (the CLI: includes starting Python and opening the store),
- ``GET /api/v1/status``, the dashboard overview ``GET /`` and ``GET /metrics`` on the admin
  plane (over loopback HTTP: the server-side time plus a local round trip),
- ``queue list --state held --limit 100`` and ``queue list --search <no match>`` (a filter that
  has to look at every row),
- ``report --check`` (once: it streams every row; it exits 1 since everything is held),
- ``check store`` where the mxspool under test has it (once: a full recount),

then releases the domain to Postfix's smtp-sink and reports the release rate and the server's
peak RSS (sampled VmRSS and the kernel's VmHWM) until every message is delivered.

Every phase is bounded in time (``--fill-timeout``, ``--release-timeout``). Must run as root
(smtp-sink runs as the postfix user); needs .ci/install-postfix and an installed mxspool.

    python bench/scale.py                          # N = 1,000,000 (about half an hour)
    python bench/scale.py --messages 10000000 --fill-timeout 14400 --release-timeout 14400
    python bench/scale.py --messages 200000 --no-release
    MXSPOOL_BIN=/tmp/head/mxspool python bench/scale.py --messages 200000   # another build
    python bench/scale.py --store-url postgresql://postgres@127.0.0.1:5432/test?options=...

The 10,000,000 run needs about 15 GiB of disk for the SQLite store and several hours.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from common import (
    HOST,
    KIB,
    BenchError,
    MxspoolServer,
    RssSampler,
    fmt,
    free_port,
    machine_summary,
    markdown_table,
    mxspool_bin,
    run_smtp_source,
)
from release import Sink, wait_until


def timed(action: Callable[[], object], repeat: int) -> tuple[float, list[float]]:
    """Median seconds of ``repeat`` calls after one warm-up call, and every sample."""
    action()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


def http_get(port: int, path: str, timeout: float = 600.0) -> bytes:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": f"{HOST}:{port}"})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise BenchError(f"GET {path}: HTTP {response.status} {body[:200]!r}")
        return body
    finally:
        conn.close()


def counts(server: MxspoolServer) -> dict[str, int]:
    for entry in server.status().get("domains", []):  # type: ignore[union-attr]
        if isinstance(entry, dict) and entry.get("domain") == server.domain:
            return {key: int(entry.get(key) or 0) for key in ("held", "pending", "delivered")}
    return {"held": 0, "pending": 0, "delivered": 0}


def fill(server: MxspoolServer, messages: int, sessions: int, size: int, timeout: float) -> float:
    """smtp-source N messages into the held domain; the accept rate (messages per second)."""
    result = run_smtp_source(
        server.port,
        sessions=sessions,
        messages=messages,
        size=size,
        persistent=True,
        timeout=timeout,
    )
    if not result.ok:
        raise BenchError(f"smtp-source failed or timed out: {result.output[-500:]}")
    if not wait_until(lambda: counts(server)["held"] >= messages, 300, step=2.0):
        raise BenchError(f"held {counts(server)['held']} of {messages} after smtp-source")
    return messages / result.elapsed


def views(server: MxspoolServer, repeat: int, quick: bool) -> list[tuple[str, float, str]]:
    """(what, median seconds, note) for each operator view."""
    out: list[tuple[str, float, str]] = []
    admin = server.admin_port

    def add(name: str, action: Callable[[], object], times: int = repeat) -> None:
        median, samples = timed(action, times)
        spread = f"{min(samples):.3f}..{max(samples):.3f} s" if len(samples) > 1 else ""
        out.append((name, median, spread))
        print(f"  {name}: {median:.3f} s {spread}", flush=True)

    add("status --json (CLI)", lambda: server.cli("status", "--json", timeout=600))
    add("GET /api/v1/status", lambda: http_get(admin, "/api/v1/status"))
    add("GET / (dashboard overview)", lambda: http_get(admin, "/"))
    add("GET /metrics", lambda: http_get(admin, "/metrics"))
    add(
        "queue list --state held --limit 100",
        lambda: server.cli("queue", "list", "--state", "held", "--limit", "100", "--json"),
    )
    if quick:
        return out
    add(
        "queue list --search nosuchaddress",
        lambda: server.cli("queue", "list", "--search", "nosuchaddress", "--json", timeout=3600),
        times=1,
    )
    add("report --check (to /dev/null)", lambda: report_check(server), times=1)
    if "store" in server.cli("check", "--help").stdout:
        add("check store", lambda: server.cli("check", "store", "--json", timeout=3600), times=1)
    return out


def report_check(server: MxspoolServer) -> None:
    cmd = [mxspool_bin(), "--config", str(server.config), "report", "--check"]
    proc = subprocess.run(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=3600, check=False
    )
    if proc.returncode not in (0, 1):
        raise BenchError(f"report --check failed ({proc.returncode}): {proc.stderr[-300:]!r}")


def release(server: MxspoolServer, messages: int, timeout: float) -> tuple[float, RssSampler]:
    """Release to smtp-sink; (messages per second, RSS of the server until all delivered)."""
    sampler = RssSampler(server.pid, interval=0.2).start()
    start = time.perf_counter()
    server.cli("domain", "release", server.domain)
    try:
        done = wait_until(lambda: counts(server)["delivered"] >= messages, timeout, step=5.0)
    finally:
        sampler.stop()
    if not done:
        raise BenchError(f"delivered {counts(server)['delivered']} of {messages} in {timeout}s")
    return messages / (time.perf_counter() - start), sampler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Operator views and release at N held messages")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=1 * KIB, help="bytes per message")
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source connections")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per view")
    parser.add_argument("--store-url", default=None, help="default: a fresh SQLite spool")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the spool here")
    parser.add_argument("--concurrency", type=int, default=20, help="[delivery] connections")
    parser.add_argument("--fill-timeout", type=float, default=3 * 3600.0)
    parser.add_argument("--release-timeout", type=float, default=3 * 3600.0)
    parser.add_argument("--no-release", action="store_true", help="skip the release phase")
    parser.add_argument("--quick", action="store_true", help="only the cheap views")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)

    print(f"# scale: {args.messages:,} held {args.size:,}-byte messages ({machine_summary()})")
    print(f"# mxspool: {mxspool_bin()}", flush=True)
    sink_port = free_port()
    extra = f"\n[delivery]\nconcurrency = {args.concurrency}\n"
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    server = MxspoolServer(
        store_url=args.store_url,
        sink_port=sink_port,
        hold=True,
        extra_toml=extra,
        workdir=args.workdir,
    )
    results: dict[str, object] = {"messages": args.messages, "mxspool": mxspool_bin()}
    rows: list[list[object]] = []
    try:
        server.start()
        started = time.perf_counter()
        rate = fill(server, args.messages, args.sessions, args.size, args.fill_timeout)
        print(f"  filled in {time.perf_counter() - started:.0f} s ({rate:,.0f} msg/s)", flush=True)
        rows.append([f"fill {args.messages:,} through SMTP", f"{rate:,.0f} msg/s", ""])
        for name, median, spread in views(server, args.repeat, args.quick):
            rows.append([name, f"{median * 1000:,.0f} ms", spread])
            results[name] = median
        if not args.no_release:
            with Sink(sink_port):
                rate, sampler = release(server, args.messages, args.release_timeout)
            peak = max(sampler.peak_rss_kib, sampler.hwm_kib) / 1024
            rows.append(["release to smtp-sink", f"{rate:,.0f} msg/s", ""])
            rows.append(["release: serve peak RSS", f"{fmt(peak)} MiB", "VmHWM"])
            results["release_rate"] = rate
            results["release_peak_rss_mib"] = peak
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        server.close()
    print()
    print(markdown_table(["what", "result", "spread"], rows))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
