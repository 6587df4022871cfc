"""Waiting in tests: on a condition with a deadline, never for a fixed time.

``wait_until`` / ``eventually`` poll a condition until it holds and fail, saying what was
awaited, when the deadline passes: a loaded machine makes them slower, not wrong.

``stays`` / ``still`` are for the other kind of check, "nothing happened": they poll for a
quiet period and fail as soon as the condition breaks. A quiet period proves nothing alone (on a
slow machine nothing happens in any short window), so every use is paired, in the same test,
with a positive control: the same kind of event observed happening where it should (and, where
it helps, the quiet period is a multiple of how long that took).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

INTERVAL = 0.02
"""Seconds between two looks at the condition."""


def wait_until(condition: Callable[[], T], within: float = 15.0, what: str = "the condition") -> T:
    """Poll ``condition`` until it returns something true; that value. TimeoutError at the
    deadline."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within:g} s waiting for {what}")
        time.sleep(INTERVAL)


async def eventually(
    condition: Callable[[], T | Awaitable[T]], within: float = 15.0, what: str = "the condition"
) -> T:
    """``wait_until`` in an event loop: ``condition`` may be a plain or a coroutine function."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(INTERVAL)


def stays(condition: Callable[[], object], seconds: float, what: str = "the condition") -> None:
    """Assert ``condition`` holds at every look for ``seconds`` (pair with a positive control)."""
    deadline = time.monotonic() + seconds
    while True:
        assert condition(), f"{what} stopped holding"
        if time.monotonic() > deadline:
            return
        time.sleep(INTERVAL)


async def still(
    condition: Callable[[], object | Awaitable[object]],
    seconds: float,
    what: str = "the condition",
) -> None:
    """``stays`` in an event loop (pair with a positive control)."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        assert value, f"{what} stopped holding"
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(INTERVAL)
