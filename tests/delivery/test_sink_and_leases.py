"""Postfix's smtp-sink as the target; crashed claims coming back through their leases."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mxspool.store.sqlite import SqliteStore
from tests.conftest import free_port, wait_for_port
from tests.delivery.conftest import (
    DOMAIN,
    EngineFactory,
    add_domain,
    delivered_control,
    put_message,
    release,
    rows,
    states,
    wait_for,
)
from tests.delivery.target import Target

SMTP_SINK = "/usr/sbin/smtp-sink"


@pytest.fixture
def sink() -> Iterator[tuple[int, Path]]:
    if not Path(SMTP_SINK).exists():
        pytest.skip("smtp-sink is missing; run .ci/install-postfix")
    port = free_port()
    # smtp-sink drops to the postfix user, which cannot enter pytest's private tmp_path.
    dumps = Path(tempfile.mkdtemp(prefix="mxspool-sink-"))
    dumps.chmod(0o755)
    shutil.chown(dumps, "postfix")
    proc = subprocess.Popen(
        [SMTP_SINK, "-u", "postfix", "-d", f"{dumps}/%M.", f"127.0.0.1:{port}", "100"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port, proc=proc)  # type: ignore[arg-type]
        yield port, dumps
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(dumps, ignore_errors=True)


async def test_release_to_postfix_smtp_sink(
    store: SqliteStore, engine: EngineFactory, sink: tuple[int, Path]
) -> None:
    port, dumps = sink
    await add_domain(store, port, hold=True)
    sent = []
    for number in range(300):
        _, data = await put_message(store, [f"u{number}@{DOMAIN}"])
        sent.append(data)
    engine(concurrency=5)
    await release(store)
    try:
        await wait_for(lambda: _delivered(store, 300), within=20)
    except TimeoutError:
        print(await states(store), [r.remote_reply for r in await rows(store)][:3])
        raise
    replies = {row.remote_reply for row in await rows(store)}
    assert all(reply and reply.startswith("250") for reply in replies), replies
    await wait_for(lambda: len(list(dumps.rglob("*"))) >= 300)
    dumped = [path.read_bytes() for path in dumps.rglob("*") if path.is_file()]
    assert len(dumped) == 300
    # smtp-sink dumps its own headers, then the message as received, with LF line ends.
    got = sorted(dump[dump.index(b"Received: from client.test") :].rstrip(b"\n") for dump in dumped)
    assert got == sorted(data.replace(b"\r\n", b"\n").rstrip(b"\n") for data in sent)


async def _none_delivering(store: SqliteStore) -> bool:
    return "delivering" not in await states(store)


async def _delivered(store: SqliteStore, count: int) -> bool:
    return (await states(store)).get("delivered", 0) == count


async def test_claims_of_a_dead_worker_come_back_after_the_lease(
    store: SqliteStore, target: Target, engine: EngineFactory, control: Target
) -> None:
    await add_domain(store, target.port, hold=False)
    for number in range(10):
        await put_message(store, [f"u{number}@{DOMAIN}"])
    # A worker of another process claims everything, then dies without a word.
    lease = 6.0  # room for the control on a loaded machine before the lease runs out
    leased_at = time.monotonic()
    claimed = await store.claim_due("dead-node:1:x", time.time(), lease, 100, DOMAIN)
    assert sum(len(job.recipients) for job in claimed) == 10
    engine()
    await delivered_control(store, control)  # the engine polls and sends...
    received, elapsed = list(target.recorder.received), time.monotonic() - leased_at
    assert elapsed < lease, "too slow to tell: the lease ran out meanwhile"
    assert received == []  # ...but not mail still leased to the dead worker
    await wait_for(lambda: len(target.recorder.received) == 10, within=lease + 10)
    await wait_for(lambda: _delivered(store, 10))


async def test_shutdown_gives_unattempted_claims_back(
    store: SqliteStore, target: Target, engine: EngineFactory
) -> None:
    target.behaviour.data_delay = 0.2
    await add_domain(store, target.port, hold=True)
    for number in range(30):
        await put_message(store, [f"u{number}@{DOMAIN}"])
    scheduler_task_engine = engine(concurrency=1)
    await release(store)
    await wait_for(lambda: len(target.recorder.received) >= 2)
    # Stop the engine as the service does on SIGTERM.
    for task in asyncio.all_tasks():
        if task.get_coro().__qualname__.startswith("Scheduler.run"):  # type: ignore[union-attr]
            task.cancel()
    # Nothing waits for a lease to expire (30 s): the claims come back within seconds.
    await wait_for(lambda: _none_delivering(store), within=10)
    counts = await states(store)
    assert counts.get("delivered", 0) + counts.get("pending", 0) == 30
    del scheduler_task_engine
