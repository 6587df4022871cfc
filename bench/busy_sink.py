"""An SMTP sink that is busy now and then, as Exchange Online is: standard library only.

Accepts and discards every message, like Postfix's smtp-sink, but answers
``451 4.7.500 Server busy`` to ``--busy`` of the MAIL, RCPT and DATA commands (each drawn at
random, seeded), as Exchange Online's "AS" throttling does. Advertises PIPELINING and answers
pipelined commands in order. Binds 127.0.0.1 only. Counts go to stdout when it stops (SIGTERM).

    python bench/busy_sink.py --port 2526 --busy 0.05 --seed 1
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys

BUSY = b"451 4.7.500 Server busy. Please try again later from [127.0.0.1]. (AS761)\r\n"
EHLO = (
    b"250-busy-sink.local\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 157286400\r\n"
    b"250 ENHANCEDSTATUSCODES\r\n"
)
MAX_LINE = 4096
MAX_DATA = 200 * 1024 * 1024


class Sink:
    def __init__(self, busy: float, seed: int) -> None:
        self.busy_share = busy
        self.random = random.Random(seed)
        self.messages = 0
        self.busy = 0

    def is_busy(self) -> bool:
        busy = self.random.random() < self.busy_share
        self.busy += busy
        return busy

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._converse(reader, writer)
        except (ConnectionError, ValueError):  # ValueError: a line over MAX_LINE
            pass
        finally:
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 busy-sink.local ESMTP\r\n")
        mail, rcpts = False, 0
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                reply = EHLO
            elif verb in (b"HELO", b"NOOP"):
                reply = b"250 2.0.0 Ok\r\n"
            elif verb == b"MAIL":
                reply = BUSY if self.is_busy() else b"250 2.1.0 Ok\r\n"
                mail, rcpts = reply is not BUSY, 0
            elif verb == b"RCPT":
                if not mail:
                    reply = b"503 5.5.1 Error: need MAIL command\r\n"
                elif self.is_busy():
                    reply = BUSY
                else:
                    rcpts += 1
                    reply = b"250 2.1.5 Ok\r\n"
            elif verb == b"DATA":
                if not mail or not rcpts:
                    reply = b"554 5.5.1 Error: no valid recipients\r\n"
                else:
                    writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    await self._read_data(reader)
                    reply = BUSY if self.is_busy() else b"250 2.0.0 Ok: queued\r\n"
                    self.messages += reply is not BUSY
                mail = False
            elif verb == b"RSET":
                mail, reply = False, b"250 2.0.0 Ok\r\n"
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                return
            else:
                reply = b"502 5.5.2 Error: command not recognized\r\n"
            writer.write(reply)
            await writer.drain()

    async def _read_data(self, reader: asyncio.StreamReader) -> None:
        size = 0
        while (line := await reader.readline()) != b".\r\n":
            if not line:
                raise ConnectionError("closed in DATA")
            size += len(line)
            if size > MAX_DATA:
                raise ConnectionError("message too large")


async def serve(port: int, busy: float, seed: int) -> Sink:
    sink = Sink(busy, seed)
    server = await asyncio.start_server(sink.session, "127.0.0.1", port, limit=MAX_LINE)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    return sink


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--busy", type=float, default=0.0, help="share of commands busy")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    sink = asyncio.run(serve(args.port, args.busy, args.seed))
    print(f"messages {sink.messages} busy {sink.busy}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
