"""Destination health: when a destination is dead, and how many connections a drain may open.

As in Postfix's qmgr, a destination is *dead* after ``dead_after_failures`` consecutive
connection failures with no session open: refused, timed out, unreachable, DNS failure, a
greeting other than 220 (421 included), or a TLS handshake the route requires that fails.
Replies inside a session (4xx, 5xx) and a session lost mid-transaction say nothing about the
destination and never count; an opened session resets the count.

A dead destination's whole queue is deferred in one store update until the next probe (see
``Drain``), and until then nothing connects to it. At the probe time a single connection is
tried; if it opens, the destination is alive again and its whole queue goes at once (every
deferred row is due at that same moment).

This state is per process (the deferral itself is in the store, so every node sees it). A
``queue flush`` means "try now" (``postqueue -f``): the store records it, every engine's
scheduler notices it (a notification, or its poll of the store's flush generation) and forgets
the flushed domains' state here, so their drains probe at once instead of at the next probe. A
destination this process knows nothing about (since start) is tried with a cohort of at most
``dead_after_failures`` connections in parallel until one opens, so a dead one costs that many
attempts and not one per worker; once a session has opened, drains fan out to full concurrency.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from mxspool import metrics


@dataclass(frozen=True, slots=True)
class Dead:
    """A dead destination's deferral: the next probe and the reason shown on each recipient."""

    until: float
    reply: str


@dataclass(slots=True)
class _State:
    failures: int = 0
    """Consecutive connection failures since the last session opened."""
    alive: bool = False
    """A session opened since the last failure, or since this process started trying."""
    dead: Dead | None = None


class DestinationHealth:
    """Per-domain connection health, shared by every drain of one process."""

    def __init__(self, dead_after_failures: int) -> None:
        self.dead_after_failures = max(1, dead_after_failures)
        self._states: dict[str, _State] = {}

    def _state(self, domain: str) -> _State:
        state = self._states.get(domain)
        if state is None:
            state = self._states[domain] = _State()
        return state

    def dead(self, domain: str) -> Dead | None:
        """The current deferral when ``domain`` is dead (also once its probe is due)."""
        state = self._states.get(domain)
        return state.dead if state is not None else None

    def connections(self, domain: str, concurrency: int) -> int:
        """How many connection attempts a drain may have open before one succeeds."""
        state = self._states.get(domain)
        if state is not None and state.dead is not None:
            return 1  # the probe
        if state is not None and state.alive:
            return concurrency
        return min(concurrency, self.dead_after_failures)

    def opened(self, domain: str) -> None:
        """A session opened: the destination is alive."""
        state = self._state(domain)
        state.failures = 0
        state.alive = True
        if state.dead is not None:
            state.dead = None
            metrics.destination_dead(domain, False)

    def failed(self, domain: str) -> int:
        """A connection attempt failed with no session open; the consecutive failures."""
        state = self._state(domain)
        state.failures += 1
        state.alive = False
        return state.failures

    def forget(self, domain: str) -> bool:
        """``queue flush`` (try now): forget what is known of ``domain``, its dead state
        included, so the next drain probes it at once; True when it was dead."""
        state = self._states.pop(domain, None)
        if state is None or state.dead is None:
            return False
        metrics.destination_dead(domain, False)
        return True

    def domains(self) -> list[str]:
        """The domains this process knows something about."""
        return list(self._states)

    def is_dead_after(self, failures: int) -> bool:
        return failures >= self.dead_after_failures

    def declare_dead(self, domain: str, reason: str, failures: int, until: float) -> Dead:
        """Mark ``domain`` dead until ``until`` (its next probe); the deferral to record."""
        dead = Dead(until, dead_reply(reason, failures, until))
        state = self._state(domain)
        if state.dead is None:
            metrics.destination_dead(domain, True)
        state.dead = dead
        return dead


def dead_reply(reason: str, failures: int, until: float) -> str:
    """The reply kept on each deferred recipient: what failed, and when the next probe is."""
    at = datetime.fromtimestamp(until, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    plural = "failure" if failures == 1 else "failures"
    return (
        f"4.4.1 destination dead: {reason} ({failures} consecutive connection {plural}); "
        f"will probe at {at}, and the whole queue goes as soon as a probe connects"
    )
