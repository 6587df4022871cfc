"""Accept-and-hold throughput: mxspool versus Postfix, driven by Postfix's smtp-source.

For each case (message size, sessions, new connection per message or ``-d``) the two systems are
run alternately, mxspool then Postfix, ``--runs`` times (A B A B ...). Each run starts from an
empty spool and must end with exactly N messages held; a run that loses messages (or whose
smtp-source fails or times out) is reported as an error, never as a rate. The table gives median
msgs/s and the ratio mxspool / Postfix.

Must run as root (Postfix). Needs .ci/install-postfix and an installed mxspool.

    python bench/accept.py                 # full run (several minutes)
    python bench/accept.py --quick --runs 1
    python bench/accept.py --store-url postgresql://bench@127.0.0.1/mxspool_bench
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from common import (
    KIB,
    BenchError,
    MxspoolServer,
    fmt,
    free_port,
    machine_summary,
    markdown_table,
    median,
    mxspool_bin,
    run_smtp_source,
)
from postfix_spool import PostfixError, PostfixSpool

SYSTEMS = ("mxspool", "postfix")


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


@dataclass
class CaseResult:
    case: Case
    runs: dict[str, list[RunResult]] = field(default_factory=lambda: {s: [] for s in SYSTEMS})

    def rates(self, system: str) -> list[float]:
        return [r.rate for r in self.runs[system] if r.rate is not None]

    def errors(self, system: str) -> int:
        return sum(1 for r in self.runs[system] if r.rate is None)


def build_cases(quick: bool, messages: int | None) -> list[Case]:
    n10 = messages or (300 if quick else 2000)
    n100 = messages or (150 if quick else 1000)
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


def run_mxspool(case: Case, run: int, store_url: str | None) -> RunResult:
    server = MxspoolServer(store_url=store_url)
    try:
        server.start()
        before = server.held_count() if server.persistent_store else 0
        res = run_smtp_source(
            server.port,
            sessions=case.sessions,
            messages=case.messages,
            size=case.size,
            persistent=case.persistent,
            timeout=case.run_timeout(),
        )
        stored = server.held_count() - before
        return judge("mxspool", case, run, res.ok, res.output, res.elapsed, stored)
    except BenchError as exc:
        return RunResult("mxspool", case.label, run, case.messages, 0.0, 0, None, str(exc))
    finally:
        server.close()


def run_postfix(case: Case, run: int, spool: PostfixSpool) -> RunResult:
    try:
        spool.flush()
        if spool.total_count() != 0:
            raise PostfixError("queue not empty after postsuper -d ALL")
        res = run_smtp_source(
            spool.port,
            sessions=case.sessions,
            messages=case.messages,
            size=case.size,
            persistent=case.persistent,
            timeout=case.run_timeout(),
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


def report(results: list[CaseResult], runs: int) -> str:
    rows = []
    for cr in results:
        mx = median(cr.rates("mxspool"))
        pf = median(cr.rates("postfix"))
        ratio = f"{mx / pf:.2f}" if mx is not None and pf else "n/a"

        rows.append(
            [
                cr.case.label,
                cr.case.messages,
                fmt(mx),
                fmt(pf),
                ratio,
                spread(cr, "mxspool"),
                spread(cr, "postfix"),
            ]
        )
    headers = [
        "case",
        "N",
        "mxspool msgs/s",
        "Postfix msgs/s",
        "mxspool/Postfix",
        "mxspool runs",
        "Postfix runs",
    ]
    return (
        f"Accept + hold, medians of {runs} alternating runs ({machine_summary()})\n\n"
        + markdown_table(headers, rows)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Accept+hold throughput, mxspool vs Postfix")
    parser.add_argument("--runs", type=int, default=3, help="runs per system and case")
    parser.add_argument("--quick", action="store_true", help="300/150 messages per run")
    parser.add_argument("--messages", type=int, help="N for every case (overrides defaults)")
    parser.add_argument("--store-url", help="mxspool store URL (default: fresh SQLite per run)")
    parser.add_argument("--systems", default="mxspool,postfix", help="comma list")
    parser.add_argument("--case", action="append", help="only cases whose label contains this")
    parser.add_argument("--json", dest="json_out", help="also write all runs to this file")
    args = parser.parse_args(argv)

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not systems or any(s not in SYSTEMS for s in systems):
        parser.error(f"--systems: choose from {', '.join(SYSTEMS)}")
    if args.runs < 1 or args.runs > 50:
        parser.error("--runs must be 1..50")
    if "postfix" in systems and os.geteuid() != 0:
        parser.error("Postfix needs root (or use --systems mxspool)")
    if "mxspool" in systems:
        try:
            mxspool_bin()
        except BenchError as exc:
            parser.error(str(exc))

    cases = build_cases(args.quick, args.messages)
    if args.case:
        cases = [c for c in cases if any(s in c.label for s in args.case)]
    results = [CaseResult(c) for c in cases]

    spool = PostfixSpool(port=free_port(), sink_port=free_port())
    try:
        if "postfix" in systems:
            spool.configure()
            spool.start()
        for cr in results:
            for run in range(1, args.runs + 1):
                for system in systems:
                    if system == "mxspool":
                        rr = run_mxspool(cr.case, run, args.store_url)
                    else:
                        rr = run_postfix(cr.case, run, spool)
                    cr.runs[system].append(rr)
                    what = f"{rr.rate:,.0f} msgs/s" if rr.rate is not None else f"ERROR {rr.error}"
                    print(
                        f"[{time.strftime('%H:%M:%S')}] {cr.case.label}, run {run}, "
                        f"{system}: {what} ({rr.elapsed:.2f}s)",
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

    print(report(results, args.runs))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(
                [asdict(r) for cr in results for s in systems for r in cr.runs[s]], f, indent=2
            )
    failed = any(cr.errors(s) for cr in results for s in systems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
