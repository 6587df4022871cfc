"""Accept-and-hold throughput: mxspool versus Postfix, driven by Postfix's smtp-source.

For each case (message size, sessions, new connection per message or ``-d``) the chosen systems
are run alternately, ``--runs`` times (A B C D A B C D ...). Systems:

- ``mxspool``: one node, a fresh SQLite spool per run (or ``--store-url``);
- ``mxspool-pg``: one node on PostgreSQL, a fresh schema per run (``--pg-url``);
- ``mxspool-pg2``: two nodes on two ports sharing one fresh schema, driven by two smtp-source
  processes at the same time, each with half the sessions and half the messages; the rate is
  N / wall time of the slower one;
- ``postfix``: Postfix as a holding spooler.

Each run starts from an empty spool and must end with exactly N messages held; a run that loses
messages (or whose smtp-source fails or times out) is reported as an error, never as a rate. The
table gives median msgs/s and each system's ratio to Postfix.

Must run as root (Postfix). Needs .ci/install-postfix and an installed mxspool.

    python bench/accept.py                 # full run (several minutes)
    python bench/accept.py --quick --runs 1
    python bench/accept.py --systems mxspool,mxspool-pg,mxspool-pg2,postfix \
        --pg-url postgresql://postgres@127.0.0.1:5432/test
    python bench/accept.py --auth on --case "10 KiB, 10 sessions"   # authentication evaluating
    python bench/accept.py --auth off --case "10 KiB, 10 sessions"  # [smtp] authentication off
    python bench/accept.py --auth both --case "10 KiB, 10 sessions"  # on, off, Postfix in turn

``--auth on`` makes SPF, DKIM and DMARC at arrival really evaluate (``authsetup``: a local DNS
server, ``spf_check_private``, a DKIM-signed message sent by every system); ``--auth off`` turns
``[smtp] authentication`` off; without ``--auth`` the configuration's default applies (on, but
smtp-source's loopback client is not SPF-checked and its messages are unsigned). ``--auth both``
adds the system ``mxspool-authoff`` (one node, authentication off, sent the same signed
message) next to ``mxspool`` (on), so both are measured against Postfix in the same run.

For the ``mxspool`` systems on SQLite the table also gives the server's CPU time per message
(``servercpu``: serve and its authentication worker processes, psutil), read once every
message has its verdict (the wait for the last verdict after smtp-source ends is shown as
"verdict lag").
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from typing import Any

import servercpu
from authsetup import AuthSetup
from common import (
    KIB,
    BenchError,
    MxspoolServer,
    SourceResult,
    fmt,
    free_port,
    machine_summary,
    markdown_table,
    median,
    mxspool_bin,
    run_smtp_source,
    settle,
)
from postfix_spool import PostfixError, PostfixSpool

SYSTEMS = ("mxspool", "mxspool-authoff", "mxspool-pg", "mxspool-pg2", "postfix")
PG_SYSTEMS = ("mxspool-pg", "mxspool-pg2")


@dataclass
class Case:
    label: str
    size: int
    sessions: int
    persistent: bool
    messages: int

    def run_timeout(self) -> float:
        # Generous: 5 ms per KiB-message-ish plus a floor; bounded.
        return min(1800.0, 120.0 + self.messages * self.size / KIB * 0.005)


@dataclass
class RunResult:
    system: str
    case: str
    run: int
    messages: int
    elapsed: float
    stored: int
    rate: float | None
    error: str = ""
    note: str = ""
    cpu_serve: float | None = None
    """CPU seconds of serve itself over the run (and its verdicts), per message."""
    cpu_workers: float | None = None
    """CPU seconds of serve's child processes (authentication workers), per message."""
    verdict_lag: float | None = None
    cpu_serve_burst: float | None = None
    """CPU seconds of serve itself while smtp-source ran (the burst), per message."""
    cpu_loop_burst: float | None = None
    """CPU seconds of serve's event loop thread during the burst, per message."""
    cpu_workers_burst: float | None = None
    """CPU seconds of the authentication workers during the burst, per message (0 when every
    check waited for the burst to end)."""

    @property
    def loop_busy(self) -> float | None:
        """Share of one core the event loop thread used during the burst (its CPU / wall time)."""
        if self.cpu_loop_burst is None or self.elapsed <= 0:
            return None
        return self.cpu_loop_burst * self.messages / self.elapsed


@dataclass
class CaseResult:
    case: Case
    runs: dict[str, list[RunResult]] = field(default_factory=lambda: {s: [] for s in SYSTEMS})

    def rates(self, system: str) -> list[float]:
        return [r.rate for r in self.runs[system] if r.rate is not None]

    def errors(self, system: str) -> int:
        return sum(1 for r in self.runs[system] if r.rate is None)

    def cpu(self, system: str) -> list[tuple[float, float]]:
        return [
            (r.cpu_serve, r.cpu_workers)
            for r in self.runs[system]
            if r.rate is not None and r.cpu_serve is not None and r.cpu_workers is not None
        ]


def build_cases(quick: bool, messages: int | None) -> list[Case]:
    n10 = messages or (300 if quick else 5000)
    n100 = messages or (150 if quick else 2000)
    return [
        Case("10 KiB, 10 sessions", 10 * KIB, 10, False, n10),
        Case("10 KiB, 50 sessions", 10 * KIB, 50, False, n10),
        Case("10 KiB, 10 sessions, -d", 10 * KIB, 10, True, n10),
        Case("100 KiB, 10 sessions", 100 * KIB, 10, False, n100),
        Case("100 KiB, 50 sessions", 100 * KIB, 50, False, n100),
    ]


def judge(
    system: str, case: Case, run: int, res_ok: bool, detail: str, elapsed: float, stored: int
) -> RunResult:
    error = ""
    if not res_ok:
        error = f"smtp-source failed: {detail[-300:]}"
    elif stored != case.messages:
        error = f"stored {stored} of {case.messages}"
    rate = None if error else case.messages / elapsed
    return RunResult(system, case.label, run, case.messages, elapsed, stored, rate, error)


class PgSchemas:
    """Fresh PostgreSQL schemas for the ``mxspool-pg*`` systems: one per run, dropped after it.

    ``base_url`` is a libpq URL (``postgresql://user@host:port/db``); the store URL of a schema
    adds ``options=-csearch_path=<schema>``. Uses psycopg (an mxspool dependency), imported only
    when a PostgreSQL system is chosen.
    """

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.live: set[str] = set()

    def _connect(self) -> Any:
        import psycopg

        try:
            return psycopg.connect(self.base_url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise BenchError(f"PostgreSQL at {self.base_url}: {exc}") from exc

    def check(self) -> None:
        with self._connect() as conn:
            conn.execute("SELECT 1")

    def create(self) -> tuple[str, str]:
        """Create an empty schema; returns (schema, store URL)."""
        schema = f"mxbench_{os.getpid()}_{secrets.token_hex(4)}"
        with self._connect() as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        self.live.add(schema)
        parts = urllib.parse.urlsplit(self.base_url)
        query = urllib.parse.parse_qsl(parts.query)
        query = [(k, v) for k, v in query if k != "options"]
        query.append(("options", f"-csearch_path={schema}"))
        url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
        return schema, url

    def drop(self, schema: str) -> None:
        with self._connect() as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        self.live.discard(schema)

    def drop_all(self) -> None:
        for schema in sorted(self.live):
            try:
                self.drop(schema)
            except BenchError as exc:
                print(f"accept: could not drop schema {schema}: {exc}", file=sys.stderr)


AUTH: dict[str, Any] = {"mode": None, "setup": None}
"""``--auth``: None (the default configuration), "off", or "on" with its AuthSetup."""


def _auth_server_options(off: bool = False) -> dict[str, Any]:
    setup: AuthSetup | None = AUTH["setup"]
    if off or AUTH["mode"] == "off":
        return {"smtp_options": {"authentication": False}}
    if setup is not None:
        return {"smtp_options": setup.smtp_options, "extra_toml": setup.toml}
    return {}


def _message_file(case: Case) -> str | None:
    setup: AuthSetup | None = AUTH["setup"]
    return setup.message_file(case.size) if setup is not None else None


def run_mxspool(case: Case, run: int, store_url: str | None, system: str = "mxspool") -> RunResult:
    off = system == "mxspool-authoff"
    server = MxspoolServer(store_url=store_url, **_auth_server_options(off))
    try:
        server.start()
        before = server.held_count() if server.persistent_store else 0
        if not off and AUTH["setup"] is not None:  # its start is not the messages' cost
            servercpu.wait_for_worker(server.log)
        settle()  # before the CPU snapshot and the timed run
        cpu_before = servercpu.snapshot(server.pid)
        res = run_smtp_source(
            server.port,
            sessions=case.sessions,
            messages=case.messages,
            size=case.size,
            persistent=case.persistent,
            timeout=case.run_timeout(),
            message_file=_message_file(case),
        )
        cpu_burst = servercpu.snapshot(server.pid)
        burst_serve, burst_workers = servercpu.used(cpu_before, cpu_burst)
        burst_loop = cpu_burst.loop - cpu_before.loop
        lag = None
        sqlite = server.store_url.removeprefix("sqlite:///")
        if not off and AUTH["mode"] != "off" and not server.persistent_store:
            lag = servercpu.wait_for_verdicts(sqlite)
        servercpu.settle(server.pid)
        serve_cpu, workers_cpu = servercpu.used(cpu_before, servercpu.snapshot(server.pid))
        stored = server.held_count() - before
        rr = judge(system, case, run, res.ok, res.output, res.elapsed, stored)
        rr.cpu_serve, rr.cpu_workers = serve_cpu / case.messages, workers_cpu / case.messages
        rr.cpu_serve_burst = burst_serve / case.messages
        rr.cpu_loop_burst = burst_loop / case.messages
        rr.cpu_workers_burst = burst_workers / case.messages
        rr.verdict_lag = lag
        if lag is not None:
            rr.note = f"verdict lag {lag:.1f}s"
        return rr
    except BenchError as exc:
        return RunResult(system, case.label, run, case.messages, 0.0, 0, None, str(exc))
    finally:
        server.close()


def run_mxspool_pg(case: Case, run: int, pg: PgSchemas) -> RunResult:
    """One node on a fresh PostgreSQL schema."""
    try:
        schema, url = pg.create()
    except BenchError as exc:
        return RunResult("mxspool-pg", case.label, run, case.messages, 0.0, 0, None, str(exc))
    try:
        return run_mxspool(case, run, url, system="mxspool-pg")
    finally:
        try:
            pg.drop(schema)
        except BenchError as exc:
            print(f"accept: could not drop schema {schema}: {exc}", file=sys.stderr)


def split(total: int) -> tuple[int, int]:
    first = max(1, total // 2)
    return first, max(1, total - first)


def run_mxspool_pg2(case: Case, run: int, pg: PgSchemas) -> RunResult:
    """Two nodes on one fresh PostgreSQL schema, each sent half the load at the same time."""
    system = "mxspool-pg2"
    try:
        schema, url = pg.create()
    except BenchError as exc:
        return RunResult(system, case.label, run, case.messages, 0.0, 0, None, str(exc))
    options = _auth_server_options()
    nodes = [MxspoolServer(store_url=url, hostname=f"bench{i}.local", **options) for i in (1, 2)]
    try:
        nodes[0].start()  # migrations + domain (held)
        nodes[1].start(setup_domain=False)  # shares the store and its domain
        before = nodes[0].held_count()
        sessions = split(case.sessions)
        messages = split(case.messages)
        if sum(messages) != case.messages:
            raise BenchError(f"cannot split {case.messages} messages over two nodes")
        results: list[SourceResult | None] = [None, None]
        go = threading.Barrier(2, timeout=30)

        def drive(i: int) -> None:
            go.wait()
            results[i] = run_smtp_source(
                nodes[i].port,
                sessions=sessions[i],
                messages=messages[i],
                size=case.size,
                persistent=case.persistent,
                timeout=case.run_timeout(),
                message_file=_message_file(case),
            )

        threads = [threading.Thread(target=drive, args=(i,), daemon=True) for i in (0, 1)]
        settle()  # once, for both: the barrier starts them together
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=case.run_timeout() + 60)
        if any(t.is_alive() for t in threads) or None in results:
            raise BenchError("a smtp-source thread did not finish")
        res = [r for r in results if r is not None]
        elapsed = max(r.elapsed for r in res)
        ok = all(r.ok for r in res)
        detail = " | ".join(r.output[-150:] for r in res if not r.ok)
        stored = nodes[1].held_count() - before  # either node: the store is shared
        rr = judge(system, case, run, ok, detail, elapsed, stored)
        rr.note = "node elapsed " + " / ".join(f"{r.elapsed:.2f}s" for r in res)
        return rr
    except BenchError as exc:
        return RunResult(system, case.label, run, case.messages, 0.0, 0, None, str(exc))
    finally:
        for node in nodes:
            node.close()
        try:
            pg.drop(schema)
        except BenchError as exc:
            print(f"accept: could not drop schema {schema}: {exc}", file=sys.stderr)


def run_postfix(case: Case, run: int, spool: PostfixSpool) -> RunResult:
    try:
        spool.flush()
        if spool.total_count() != 0:
            raise PostfixError("queue not empty after postsuper -d ALL")
        settle()
        res = run_smtp_source(
            spool.port,
            sessions=case.sessions,
            messages=case.messages,
            size=case.size,
            persistent=case.persistent,
            timeout=case.run_timeout(),
            message_file=_message_file(case),
        )
        stored = spool.held_count()
        return judge("postfix", case, run, res.ok, res.output, res.elapsed, stored)
    except PostfixError as exc:
        return RunResult("postfix", case.label, run, case.messages, 0.0, 0, None, str(exc))
    finally:
        try:
            spool.flush()
        except PostfixError:
            pass


def spread(cr: CaseResult, system: str) -> str:
    rates = sorted(cr.rates(system))
    errs = cr.errors(system)
    text = ", ".join(f"{r:.0f}" for r in rates) or "-"
    return text + (f" ({errs} err)" if errs else "")


def report(results: list[CaseResult], systems: list[str], runs: int) -> str:
    """One row per case and system: median msgs/s, ratio to Postfix's median, every run."""
    rows = []
    for cr in results:
        pf = median(cr.rates("postfix")) if "postfix" in systems else None
        for system in systems:
            med = median(cr.rates(system))
            ratio = f"{med / pf:.2f}" if med is not None and pf else "n/a"
            rows.append(
                [cr.case.label, cr.case.messages, system, fmt(med), ratio, spread(cr, system)]
            )
    headers = ["case", "N", "system", "msgs/s (median)", "ratio to Postfix", "runs (msgs/s)"]
    text = (
        f"Accept + hold, medians of {runs} alternating runs ({machine_summary()})\n\n"
        + markdown_table(headers, rows)
    )
    cpu_rows = []
    for cr in results:
        for system in systems:
            cpu = cr.cpu(system)
            if not cpu:
                continue
            serve = median([c[0] * 1000 for c in cpu]) or 0.0
            workers = median([c[1] * 1000 for c in cpu]) or 0.0
            total = median([(c[0] + c[1]) * 1000 for c in cpu]) or 0.0
            runs_text = ", ".join(f"{(c[0] + c[1]) * 1000:.2f}" for c in cpu)
            lags = [r.verdict_lag for r in cr.runs[system] if r.verdict_lag is not None]
            lag = f"{median(lags):.1f}" if lags else "-"
            ok = [r for r in cr.runs[system] if r.rate is not None]
            bursts = [r.cpu_serve_burst * 1000 for r in ok if r.cpu_serve_burst is not None]
            burst = f"{median(bursts) or 0.0:.2f}" if bursts else "-"
            loops = [r.cpu_loop_burst * 1000 for r in ok if r.cpu_loop_burst is not None]
            loop = f"{median(loops) or 0.0:.2f}" if loops else "-"
            busy_shares = [r.loop_busy * 100 for r in ok if r.loop_busy is not None]
            busy = f"{median(busy_shares) or 0.0:.0f}%" if busy_shares else "-"
            row = [cr.case.label, system, f"{total:.2f}", f"{serve:.2f}", burst, loop, busy]
            row.append(f"{workers:.2f}")
            in_burst = [r.cpu_workers_burst * 1000 for r in ok if r.cpu_workers_burst is not None]
            row.append(f"{median(in_burst) or 0.0:.2f}" if in_burst else "-")
            cpu_rows.append([*row, lag, runs_text])
    if cpu_rows:
        cpu_headers = [
            "case",
            "system",
            "CPU ms/msg",
            "serve",
            "serve in burst",
            "loop in burst",
            "loop busy",
            "workers",
            "workers in burst",
            "verdict lag s",
            "runs (ms/msg)",
        ]
        text += (
            "\n\nServer CPU per message (medians; serve and its child processes, psutil)\n\n"
            + markdown_table(cpu_headers, cpu_rows)
        )
    return text + f"\n\nload average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Accept+hold throughput, mxspool vs Postfix")
    parser.add_argument("--runs", type=int, default=3, help="runs per system and case")
    parser.add_argument("--quick", action="store_true", help="300/150 messages per run")
    parser.add_argument("--messages", type=int, help="N for every case (overrides defaults)")
    parser.add_argument("--store-url", help="mxspool store URL (default: fresh SQLite per run)")
    parser.add_argument(
        "--systems", default="mxspool,postfix", help=f"comma list of {', '.join(SYSTEMS)}"
    )
    parser.add_argument(
        "--pg-url",
        help="PostgreSQL URL for mxspool-pg/mxspool-pg2 (a fresh schema is made for each run)",
    )
    parser.add_argument(
        "--case",
        action="append",
        help="only this case (exact label), else cases whose label contains this",
    )
    parser.add_argument("--json", dest="json_out", help="also write all runs to this file")
    parser.add_argument(
        "--auth",
        choices=("on", "off", "both"),
        help="on: SPF/DKIM/DMARC at arrival really evaluated (local DNS, signed message); "
        "off: [smtp] authentication = false; both: on, plus the system mxspool-authoff; "
        "default: the configuration's default",
    )
    args = parser.parse_args(argv)
    AUTH["mode"] = args.auth
    if args.auth in ("on", "both"):
        AUTH["setup"] = AuthSetup()

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if args.auth == "both" and "mxspool-authoff" not in systems:
        at = systems.index("mxspool") + 1 if "mxspool" in systems else 0
        systems.insert(at, "mxspool-authoff")
    if not systems or any(s not in SYSTEMS for s in systems):
        parser.error(f"--systems: choose from {', '.join(SYSTEMS)}")
    if args.runs < 1 or args.runs > 50:
        parser.error("--runs must be 1..50")
    if "postfix" in systems and os.geteuid() != 0:
        parser.error("Postfix needs root (or use --systems mxspool)")
    if any(s.startswith("mxspool") for s in systems):
        try:
            mxspool_bin()
        except BenchError as exc:
            parser.error(str(exc))
    pg: PgSchemas | None = None
    if any(s in PG_SYSTEMS for s in systems):
        if not args.pg_url:
            parser.error("mxspool-pg and mxspool-pg2 need --pg-url")
        pg = PgSchemas(args.pg_url)
        try:
            pg.check()
        except BenchError as exc:
            parser.error(str(exc))

    cases = build_cases(args.quick, args.messages)
    if args.case:
        labels = {c.label for c in cases}
        cases = [
            c
            for c in cases
            if any(c.label == s if s in labels else s in c.label for s in args.case)
        ]
        if not cases:  # else an empty table and exit status 0, as if all had gone well
            parser.error(
                f"no case matches --case {' / '.join(args.case)}; the cases are: "
                + "; ".join(sorted(labels))
            )
    results = [CaseResult(c) for c in cases]

    spool = PostfixSpool(port=free_port(), sink_port=free_port())
    try:
        if "postfix" in systems:
            spool.configure()
            spool.start()
        for cr in results:
            for run in range(1, args.runs + 1):
                for system in systems:
                    if system in ("mxspool", "mxspool-authoff"):
                        rr = run_mxspool(cr.case, run, args.store_url, system=system)
                    elif system == "mxspool-pg" and pg is not None:
                        rr = run_mxspool_pg(cr.case, run, pg)
                    elif system == "mxspool-pg2" and pg is not None:
                        rr = run_mxspool_pg2(cr.case, run, pg)
                    else:
                        rr = run_postfix(cr.case, run, spool)
                    cr.runs[system].append(rr)
                    what = f"{rr.rate:,.0f} msgs/s" if rr.rate is not None else f"ERROR {rr.error}"
                    note = f", {rr.note}" if rr.note else ""
                    print(
                        f"[{time.strftime('%H:%M:%S')}] {cr.case.label}, run {run}, "
                        f"{system}: {what} ({rr.elapsed:.2f}s{note})",
                        file=sys.stderr,
                        flush=True,
                    )
    except PostfixError as exc:
        print(f"accept: postfix: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("accept: interrupted", file=sys.stderr)
        return 130
    finally:
        if "postfix" in systems:
            spool.stop()
        if pg is not None:
            pg.drop_all()
        if AUTH["setup"] is not None:
            AUTH["setup"].close()

    print(report(results, systems, args.runs))
    if args.auth:
        print(f"\n--auth {args.auth}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(
                [asdict(r) for cr in results for s in systems for r in cr.runs[s]], f, indent=2
            )
    failed = any(cr.errors(s) for cr in results for s in systems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
