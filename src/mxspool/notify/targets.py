"""What every notification target is to the dispatcher: a name, a filter, one attempt.

A target's ``attempt`` sends one event once and raises :class:`SendFailed` when it did not
get through, saying whether trying again could help (a refused request will be refused
again). Retrying, pacing and queueing are the dispatcher's, the same for every kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mxspool.config import ConfigError, NotifyTarget
from mxspool.notify.events import Event


class SendFailed(Exception):
    """One attempt failed; ``retry`` says whether another attempt could succeed."""

    def __init__(self, message: str, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    backoff: float
    give_up_after: float
    cap: float = 300.0

    def delay(self, failures: int) -> float:
        """The wait after the ``failures``-th failed attempt (1, 2, ...)."""
        return float(min(self.cap, self.backoff * 2 ** (failures - 1)))


class Target(Protocol):
    name: str
    kind: str
    policy: RetryPolicy
    backlog_threshold: int

    def wants(self, event: Event) -> bool: ...

    async def attempt(self, event: Event) -> str:
        """Send ``event`` once; a short description of the success (e.g. "HTTP 200")."""

    async def close(self) -> None: ...


def wanted(entry: NotifyTarget, event: Event, threshold: int) -> bool:
    """The entry's events filter (test always passes); backlog events at its own threshold."""
    if event.event == "test":
        return True
    if entry.events and event.event not in entry.events:
        return False
    if event.event == "backlog_high":
        return bool(event.details.get("threshold") == threshold)
    return True


def read_secret(entry: NotifyTarget) -> bytes:
    if entry.secret:
        return entry.secret.encode()
    try:
        text = Path(entry.secret_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"[[notify]] {entry.url}: cannot read secret_file {entry.secret_file}: "
            f"{exc.strerror or exc}; create it or fix the path"
        ) from None
    if not text:
        raise ConfigError(f"[[notify]] {entry.url}: secret_file {entry.secret_file} is empty")
    return text.encode()


def policy_of(entry: NotifyTarget) -> RetryPolicy:
    return RetryPolicy(entry.max_attempts, entry.backoff, entry.give_up_after)
