"""``GET /readyz`` on a real node over real HTTP: ready when listeners, store, delivery and disk
are; 503 naming the disk when free space falls under ``min_free_space``, and ready again once
it is back. The spool lives on a small tmpfs (root needed) so the free space is exact."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest

from mxspool.admin import readyz as readyz_module
from mxspool.admin.context import AdminContext
from tests.admin.conftest import AdminNode
from tests.waiting import wait_until

MIB = 1 << 20


@pytest.fixture
def small_node(tmp_path: Path) -> Iterator[AdminNode]:
    """A node whose spool is on a 64 MiB tmpfs, with min_free_space 32 MiB."""
    (tmp_path / "node").mkdir()
    node = AdminNode(tmp_path / "node", store={"min_free_space": "32MiB"})
    data = node.db.parent
    data.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64M,mode=0755", "tmpfs", str(data)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({mounted.stderr.strip()}); needs root")
    try:
        node.start()
        yield node
    finally:
        node.stop()
        subprocess.run(["umount", "-l", str(data)], check=False)


def readyz(node: AdminNode) -> tuple[int, dict[str, Any]]:
    # No Authorization header: /readyz is open on a loopback listener, like /healthz.
    response = httpx.get(f"{node.url}/readyz", timeout=10)
    return response.status_code, response.json()


def test_readyz_follows_the_disk_budget_and_needs_no_token_on_loopback(
    small_node: AdminNode,
) -> None:
    node = small_node
    _status, body = wait_until(lambda: (r := readyz(node))[0] == 200 and r, 15, "ready")
    assert body["status"] == "ready" and body["failed"] == []
    assert set(body["checks"]) == {"listeners", "store", "delivery", "disk"}
    assert all(check["ok"] for check in body["checks"].values())
    # The API itself does want the token (so the open /readyz is a choice, not an accident).
    assert httpx.get(f"{node.url}/api/v1/status", timeout=10).status_code == 401

    filler = node.db.parent / "filler"
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, 40 * MIB)  # 64 MiB disk: now under 32 MiB free
    finally:
        os.close(fd)
    _status, body = wait_until(lambda: (r := readyz(node))[0] == 503 and r, 15, "not ready")
    assert body["status"] == "not ready" and body["failed"] == ["disk"]
    assert "min_free_space" in body["checks"]["disk"]["detail"]
    assert body["checks"]["store"]["ok"] and body["checks"]["listeners"]["ok"]

    filler.unlink()
    _status, body = wait_until(lambda: (r := readyz(node))[0] == 200 and r, 15, "ready again")
    assert body["failed"] == []


def test_readyz_refuses_a_foreign_host(small_node: AdminNode) -> None:
    response = httpx.get(f"{small_node.url}/readyz", headers={"Host": "evil.example"}, timeout=10)
    assert response.status_code == 421
    # The control: the right host gets an answer (ready once the node's first turns are done).
    wait_until(lambda: readyz(small_node)[0] == 200, 15, "ready for the right host")


class CountingStore:
    """Just what the store probe calls, counted."""

    def __init__(self) -> None:
        self.writes = 0
        self.gate = asyncio.Event()
        """Holds each probe's commit open until the test opens it (a commit in flight)."""

    async def take_tokens(self, *_args: Any) -> int:
        self.writes += 1
        await self.gate.wait()
        return 1

    async def open_gate(self) -> None:
        self.gate.set()

    async def domains_generation(self) -> int:
        return 0


async def test_the_store_probe_is_shared_within_its_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    store = CountingStore()
    admin = cast(AdminContext, SimpleNamespace(store=store))
    probe = readyz_module.StoreProbe()
    checks = [asyncio.ensure_future(probe.check(admin)) for _ in range(50)]
    # Tasks run in the order they were made: all fifty are waiting when the commit completes.
    opening = asyncio.ensure_future(store.open_gate())
    results = await asyncio.gather(*checks, opening)
    assert all(result.ok for result in results[:50])
    assert store.writes == 1  # fifty requests, one commit
    monkeypatch.setattr(readyz_module, "PROBE_TTL", 0.0)  # control: no sharing, one each
    await asyncio.gather(*(probe.check(admin) for _ in range(5)))
    assert store.writes == 6
