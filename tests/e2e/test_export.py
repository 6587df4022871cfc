"""``mxspool export`` on a real store: mail sent through real SMTP to ``serve``, exported as
mboxrd and eml-zip, compared byte for byte with the stored bytes and the ledger's sha256; and
200 messages of 1 MiB exported with the process's peak RSS measured."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import mailbox
import re
import smtplib
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mxspool import cli as cli_module
from mxspool.body import BodyBuffer
from mxspool.envelope import Envelope, MailParams, Recipient
from mxspool.ids import new_queue_id
from mxspool.store import create_store
from mxspool.store.base import ClientInfo, IncomingMessage
from tests.conftest import Spooler
from tests.test_cli import MXSPOOL

TRICKY = (
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"From the start of a line\r\n>From already quoted\r\n>>From twice\r\n"
    b"8-bit: caf\xc3\xa9 \xff\xfe\r\nFrom\r\n From not at start\r\nlast line\r\n"
)


def send(node: Spooler, rcpts: list[str], body: bytes, sender: str = "s@src.test") -> str:
    with smtplib.SMTP("127.0.0.1", node.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail(sender, ["BODY=8BITMIME"])
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        code, reply = client.data(body)
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[-1]


def run_cli(node: Spooler, *args: str, code: int = 0) -> Any:
    """A read-only command in this process (no interpreter start-up per call)."""
    result = CliRunner().invoke(cli_module.cli, ["--config", str(node.config), *args])
    assert result.exit_code == code, (args, result.output, result.stderr)
    return result


def unquote(data: bytes) -> bytes:
    return re.sub(rb"(?m)^>(>*From )", rb"\1", data)


def test_mbox_and_eml_zip_are_byte_exact(spooler_factory: Any) -> None:
    node: Spooler = spooler_factory()
    for name in ("a.test", "b.test", "other.test"):
        node.cli("domain", "add", name, "--route", "127.0.0.1:9", "--tls", "off", "--hold")
    node.start()
    both = send(node, ["x@a.test", "y@a.test", "z@b.test"], TRICKY)  # several recipients
    plain = send(node, ["w@b.test"], b"Subject: plain\r\n\r\nhello\r\n", sender="")
    other = send(node, ["o@other.test"], b"Subject: not exported\r\n\r\n.\r\n")
    stored = {qid: run_cli(node, "queue", "export", qid).stdout_bytes for qid in (both, plain)}
    assert b"Received: " in stored[both] and stored[both].endswith(b"last line\r\n")
    ledger = {
        row["id"]: row["sha256"]
        for row in csv.DictReader(io.StringIO(run_cli(node, "report").stdout))
    }

    mbox_file = node.root / "out.mbox"
    with mbox_file.open("wb") as out:
        done = subprocess.run(
            [MXSPOOL, "--config", str(node.config), "export", "--domain", "a.test",
             "--domain", "b.test", "--format", "mbox"],
            stdout=out, stderr=subprocess.PIPE, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "exported 2 messages" in done.stderr
    raw = mbox_file.read_bytes()
    assert b"\n>From the start" in raw and b"\n>>From already" in raw  # quoted (mboxrd)
    box = mailbox.mbox(mbox_file)
    messages = [unquote(box.get_bytes(key)) for key in box.iterkeys()]
    assert messages == [stored[both], stored[plain]]  # once each, byte-exact, in order
    froms = [box.get_message(key).get_from() for key in box.iterkeys()]
    assert froms[0].startswith("s@src.test ") and froms[1].startswith("MAILER-DAEMON ")
    assert other not in raw.decode("latin-1")

    zipped = run_cli(node, "export", "--domain", "a.test", "--domain", "b.test", "--format",
                     "eml-zip").stdout_bytes  # fmt: skip
    with zipfile.ZipFile(io.BytesIO(zipped)) as archive:
        assert archive.namelist() == [f"{both}.eml", f"{plain}.eml", "index.csv"]
        for qid in (both, plain):
            data = archive.read(f"{qid}.eml")
            assert data == stored[qid]
            assert hashlib.sha256(data).hexdigest() == ledger[qid]
        index = list(csv.DictReader(io.StringIO(archive.read("index.csv").decode())))
    assert [row["queue_id"] for row in index] == [both, plain]
    assert index[0]["recipients"] == "x@a.test y@a.test z@b.test"
    assert all(row["sha256"] == ledger[row["queue_id"]] for row in index)

    # --state: only messages with a recipient in that state (and the control: all held).
    none = run_cli(node, "export", "--domain", "a.test", "--state", "delivered", "--format", "mbox")
    assert none.stdout_bytes == b"" and "exported 0 messages" in none.stderr
    held = run_cli(node, "export", "--domain", "b.test", "--state", "held", "--format", "mbox")
    assert held.stdout_bytes.count(b"\nFrom ") + held.stdout_bytes.startswith(b"From ") == 2
    bad = run_cli(node, "export", "--domain", "a.test", "--state", "lost", "--format", "mbox",
                  code=2)  # fmt: skip
    assert "lost" in bad.stderr


MIB = 1024 * 1024
COUNT = 200

RSS_WRAPPER = (
    "import atexit, resource, sys\n"
    "out = sys.argv.pop(1)\n"
    "atexit.register(lambda: open(out, 'w').write("
    "str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))\n"
    "from mxspool.cli import main\n"
    "sys.argv[0] = 'mxspool'\n"
    "main()\n"
)


def _fill(url: str) -> None:
    line = b"z" * 998 + b"\r\n"

    async def work() -> None:
        store = create_store(url)
        await store.open()
        try:
            for n in range(COUNT):
                body = BodyBuffer(2 * MIB)
                body.write(f"Subject: big {n}\r\n\r\nFrom line {n}\r\n".encode())
                body.write(line * (MIB // len(line)))
                await store.accept_message(
                    IncomingMessage(
                        id=new_queue_id(),
                        envelope=Envelope("s@src.test", MailParams(), (Recipient("u@big.test"),)),
                        client=ClientInfo(address="192.0.2.7", helo="client.src.test"),
                        received_at=time.time(),
                        message_id=None,
                        body=body,
                    )
                )
                body.close()
        finally:
            await store.close()

    asyncio.run(work())


def _peak_kib(node: Spooler, tmp: Path, fmt: str, domain: str) -> tuple[int, int]:
    """(peak RSS in KiB, bytes written) of one ``mxspool export`` process."""
    rss, target = tmp / f"rss-{fmt}-{domain}", tmp / f"out-{fmt}-{domain}"
    with target.open("wb") as out:
        done = subprocess.run(
            [sys.executable, "-c", RSS_WRAPPER, str(rss), "--config", str(node.config),
             "export", "--domain", domain, "--format", fmt],
            stdout=out, stderr=subprocess.PIPE, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    size = target.stat().st_size
    target.replace(tmp / "out.zip") if fmt == "eml-zip" else target.unlink()
    return int(rss.read_text()), size


@pytest.mark.slow
def test_export_memory_stays_flat(spooler_factory: Any, tmp_path: Path) -> None:
    node: Spooler = spooler_factory()
    node.cli("domain", "add", "big.test", "--route", "127.0.0.1:9", "--tls", "off", "--hold")
    node.cli("domain", "add", "empty.test", "--route", "127.0.0.1:9", "--tls", "off", "--hold")
    _fill(f"sqlite:///{node.db}")
    total = COUNT * (MIB // 1000) * 1000  # the bodies' 1000-byte lines
    baseline, _empty = _peak_kib(node, tmp_path, "mbox", "empty.test")
    for fmt in ("mbox", "eml-zip"):
        peak, size = _peak_kib(node, tmp_path, fmt, "big.test")
        growth_mib = (peak - baseline) / 1024
        print(f"\nexport {fmt}: {COUNT} x 1 MiB, {size / MIB:.0f} MiB written; peak RSS "
              f"{peak / 1024:.0f} MiB, {growth_mib:.1f} MiB over an empty export")  # fmt: skip
        if fmt == "mbox":
            assert size > total  # everything was written (positive control)
        else:
            with zipfile.ZipFile(tmp_path / "out.zip") as archive:
                assert len(archive.namelist()) == COUNT + 1  # every message and the index
        assert growth_mib < 40, f"{fmt}: peak RSS grew {growth_mib:.1f} MiB for {total / MIB} MiB"


def test_mboxrd_quoting_survives_any_piece_boundary() -> None:
    """Lines cut anywhere between store pieces are quoted as if whole, and unquote exactly."""
    import random

    from mxspool.evidence.mboxrd import Quoter

    rng = random.Random(12)
    parts = [b">", b"F", b"rom", b" ", b"\r\n", b"x", b"From ", b">From ", b"\xff"]
    for _ in range(3000):
        data = b"".join(rng.choice(parts) for _ in range(rng.randint(0, 30)))
        quoter, out, i = Quoter(), b"", 0
        while i < len(data):
            step = rng.randint(1, 7)
            out += quoter.feed(data[i : i + step])
            i += step
        out += quoter.finish()
        assert out == re.sub(rb"(?m)^(>*From )", rb">\1", data), data
        assert unquote(out) == data
