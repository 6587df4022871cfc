"""Peak memory of ``mxspool serve`` under many concurrent large messages.

Starts mxspool with a held domain, opens ``--sessions`` (default 200) concurrent SMTP sessions
that each send one ``--size-mib`` (default 20 MiB) message, streamed in 64 KiB chunks of
998-character lines (nothing is built whole in the client), and samples the server's RSS while
they run. Every session must get 250 after the final dot and the server must then hold exactly
``--sessions`` messages. Prints peak RSS (kernel VmHWM and sampled VmRSS) in MiB and wall time.

    python bench/memory.py
    python bench/memory.py --sessions 50 --size-mib 5
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass

from common import HOST, KIB, MIB, BenchError, MxspoolServer, RssSampler, markdown_table

LINE_LEN = 998
CHUNK_LINES = 64


def _line(n: int) -> bytes:
    alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    start = n % len(alphabet)
    rotated = alphabet[start:] + alphabet[:start]
    return (rotated * (LINE_LEN // len(alphabet) + 1))[:LINE_LEN] + b"\r\n"


# One shared 64-line chunk (about 64 KiB); every session streams it repeatedly.
CHUNK = b"".join(_line(i) for i in range(CHUNK_LINES))


class SmtpFailure(Exception):
    pass


@dataclass
class SessionResult:
    index: int
    ok: bool
    reply: str
    seconds: float


async def read_reply(reader: asyncio.StreamReader, step_s: float) -> tuple[int, str]:
    lines: list[str] = []
    for _ in range(100):  # bounded multi-line reply
        raw = await asyncio.wait_for(reader.readline(), step_s)
        if not raw:
            raise SmtpFailure("connection closed" + (f" after {lines}" if lines else ""))
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            break
    try:
        code = int(lines[-1][:3])
    except ValueError as exc:
        raise SmtpFailure(f"bad reply {lines!r}") from exc
    return code, "\n".join(lines)


async def command(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    line: str,
    expect: int,
    step_s: float,
) -> str:
    writer.write(line.encode() + b"\r\n")
    await writer.drain()
    code, text = await read_reply(reader, step_s)
    if code != expect:
        raise SmtpFailure(f"{line.split(':', maxsplit=1)[0]}: {text}")
    return text


async def send_one(index: int, port: int, size: int, step_s: float) -> SessionResult:
    start = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), step_s)
        code, text = await read_reply(reader, step_s)
        if code != 220:
            raise SmtpFailure(f"greeting: {text}")
        ehlo = await command(reader, writer, "EHLO client.test", 250, step_s)
        size_param = f" SIZE={size}" if "SIZE" in ehlo.upper() else ""
        await command(reader, writer, f"MAIL FROM:<a@src.test>{size_param}", 250, step_s)
        await command(reader, writer, f"RCPT TO:<u{index}@example.test>", 250, step_s)
        await command(reader, writer, "DATA", 354, step_s)
        header = (
            f"From: <a@src.test>\r\nTo: <u{index}@example.test>\r\n"
            f"Subject: memory bench {index}\r\n"
            f"Message-ID: <mem-{index}-{time.time_ns()}@src.test>\r\n\r\n"
        ).encode()
        writer.write(header)
        sent = len(header)
        # Whole chunks, then whole lines from the chunk, so every line is a full 998 chars.
        while sent + len(CHUNK) <= size:
            writer.write(CHUNK)
            sent += len(CHUNK)
            await asyncio.wait_for(writer.drain(), step_s)
        rest = max(0, (size - sent) // (LINE_LEN + 2))
        if rest:
            writer.write(CHUNK[: rest * (LINE_LEN + 2)])
        writer.write(b".\r\n")
        await asyncio.wait_for(writer.drain(), step_s)
        code, text = await read_reply(reader, step_s)
        if code != 250:
            raise SmtpFailure(f"end of data: {text}")
        try:
            await command(reader, writer, "QUIT", 221, step_s)
        except (SmtpFailure, OSError, TimeoutError):
            pass  # the message is accepted; a sloppy QUIT does not matter here
        return SessionResult(index, True, text, time.monotonic() - start)
    except (SmtpFailure, OSError, TimeoutError) as exc:
        return SessionResult(index, False, f"{type(exc).__name__}: {exc}", time.monotonic() - start)
    finally:
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 5)
            except (OSError, TimeoutError):
                pass


async def drive(port: int, sessions: int, size: int, step_s: float) -> list[SessionResult]:
    tasks = [send_one(i, port, size, step_s) for i in range(sessions)]
    return list(await asyncio.gather(*tasks))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Peak RSS of mxspool under large messages")
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--size-mib", type=float, default=20.0)
    parser.add_argument("--store-url", help="mxspool store URL (default: fresh SQLite)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per SMTP step, seconds")
    parser.add_argument("--deadline", type=float, default=1800.0, help="whole run, seconds")
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= 5000:
        parser.error("--sessions must be 1..5000")
    size = int(args.size_mib * MIB)
    if size < 4 * KIB:
        parser.error("--size-mib too small")

    limit_mib = max(150, int(args.size_mib * 2) + 1)
    server = MxspoolServer(
        store_url=args.store_url,
        smtp_options={
            "max_connections": max(1000, args.sessions + 10),
            "max_connections_per_ip": args.sessions + 10,
            "max_message_size": f"{limit_mib}MiB",
        },
    )
    sampler: RssSampler | None = None
    try:
        server.start()
        before = server.held_count() if server.persistent_store else 0
        sampler = RssSampler(server.pid, interval=0.05).start()
        idle_rss = sampler.peak_rss_kib
        start = time.monotonic()
        results = asyncio.run(
            asyncio.wait_for(drive(server.port, args.sessions, size, args.timeout), args.deadline)
        )
        wall = time.monotonic() - start
        sampler.stop()
        stored = server.held_count() - before
    except (BenchError, TimeoutError) as exc:
        print(f"memory: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if sampler is not None:
            sampler.stop()
        server.close()

    failed = [r for r in results if not r.ok]
    for r in failed[:10]:
        print(f"session {r.index}: {r.reply}", file=sys.stderr)
    total_mib = args.sessions * size / MIB
    rows = [
        ["sessions x size", f"{args.sessions} x {args.size_mib:g} MiB ({total_mib:,.0f} MiB)"],
        ["accepted (250)", f"{args.sessions - len(failed)} of {args.sessions}"],
        ["stored (held)", f"{stored} of {args.sessions}"],
        ["idle RSS before load", f"{idle_rss / KIB:,.1f} MiB"],
        ["peak RSS, VmHWM", f"{sampler.hwm_kib / KIB:,.1f} MiB"],
        ["peak RSS, sampled VmRSS", f"{sampler.peak_rss_kib / KIB:,.1f} MiB"],
        ["peak RSS incl. children", f"{sampler.peak_tree_kib / KIB:,.1f} MiB"],
        ["wall time", f"{wall:,.1f} s ({total_mib / wall:,.0f} MiB/s)"],
        ["samples", str(sampler.samples)],
    ]
    print(markdown_table(["measure", "value"], rows))
    if failed or stored != args.sessions:
        print("memory: FAILED: not every message was accepted and stored", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
