"""How fast to send to a destination that says it is busy: AIMD on the share of busy replies.

Exchange Online answers ``451 4.7.500``-``4.7.699`` ("server busy", its "AS" throttling) when
it wants a sender to slow down, but it also answers that now and then to a sender going at a
perfectly acceptable pace (a busy front end, another tenant's load). Each such reply already
defers its recipient, which is retried by itself; what the rate must follow is whether the
target is busy *as a whole*, not that one reply said so. Halving the rate on every such reply
(once a second, recovering by a quarter every 30 s), as the profile did before, drove a
release against a target that answered 5% of its commands that way down to the floor and kept
it there.

So the signal is the share of a transaction's replies that are busy replies, judged over a
window (``WINDOW`` seconds and at least ``WINDOW_TRANSACTIONS`` transactions, whichever is
later; at most ``LONG_WINDOW`` seconds once one transaction is in), and the rate follows AIMD
(additive increase, multiplicative decrease), the rule TCP uses for the same problem:

- a window in which more than ``BUSY_SHARE`` (half) of the replies were busy, on average over
  its transactions, is a busy target: the rate is multiplied by ``DECREASE`` (halved), never
  below ``MIN_RATE`` (throttling slows delivery, it never stops it);
- any other window, while the rate is reduced, adds ``INCREASE_SHARE`` (a tenth) of the
  ceiling: back at the ceiling after ten calm windows from anywhere, after which the limit is
  lifted. The ceiling is the configured rate, or for an unpaced domain the rate seen just
  before the first cut (then unpaced again).

Why AIMD rather than "halve, then grow by a quarter every 30 s": multiplicative decrease backs
off quickly from a target that really is overloaded (after a few windows of sustained busy
replies the rate is near the floor), additive increase probes back up in small, even steps,
and only a share above the threshold counts as a decrease, so sparse busy replies (5% of
commands answer 451 at random: about 14% of one-recipient transactions) leave the rate alone.
Why the share and not a count: a count grows with the rate, so a faster release would see
"more throttling" from the same random 5%. Why at most one change per window: a change must
take effect before it is judged, or one busy burst would halve the rate again and again.
"""

from __future__ import annotations

import math

WINDOW = 1.0
"""Seconds of replies judged together; the rate changes at most once per window."""
WINDOW_TRANSACTIONS = 3
"""A window also waits for this many transactions, so one or two unlucky replies at a low
rate do not make a busy target (``LONG_WINDOW`` caps the wait)."""
LONG_WINDOW = 10.0
BUSY_SHARE = 0.5
"""More than this share of replies busy, on average over a window: the target is busy. Half,
not less: at low rates a window holds few transactions, and with a lower threshold the random
5% (14% of one-recipient transactions) crosses it by chance every few windows (simulated: a
third cost a 5/s release a fifth of its rate, half costs it 3%)."""
DECREASE = 0.5
INCREASE_SHARE = 0.1
"""Added per calm window while reduced: this share of the ceiling."""
MIN_RATE = 0.1
"""Messages per second the adaptive rate never goes below: throttling slows, never stops."""


class AdaptiveRate:
    """One destination's rate limit under busy replies (see the module docstring)."""

    def __init__(self) -> None:
        self.limit: float | None = None
        """Messages per second imposed by busy replies; None when not reduced."""
        self._ceiling = 0.0
        self._window_start = -math.inf
        self._transactions = 0
        self._busy = 0.0
        """Sum over the window's transactions of the share of their replies that were busy."""

    def observe(self, now: float, replies: int, busy: int, current: float) -> bool:
        """One transaction's replies (``busy`` of them busy replies); ``current``: the rate in
        force, or the rate seen lately when unpaced. True when this cut the rate."""
        if replies <= 0:
            return False
        if self._window_start == -math.inf:
            self._window_start = now
        self._transactions += 1
        self._busy += busy / replies
        elapsed = now - self._window_start
        if elapsed < WINDOW or (self._transactions < WINDOW_TRANSACTIONS and elapsed < LONG_WINDOW):
            return False
        share = self._busy / self._transactions
        self._window_start, self._transactions, self._busy = now, 0, 0.0
        if share > BUSY_SHARE:
            if self.limit is None:
                self._ceiling = current
            base = self.limit if self.limit is not None else current
            self.limit = max(MIN_RATE, base * DECREASE)
            return True
        if self.limit is not None:
            self.limit += INCREASE_SHARE * self._ceiling
        return False

    def effective(self, configured: float) -> float:
        """The rate to pace at now: ``configured`` (0 = unpaced) unless reduced."""
        if self.limit is None:
            return configured
        if configured > 0.0:
            self._ceiling = configured
        if self.limit >= self._ceiling:
            self.limit = None
            return configured
        return self.limit if configured <= 0.0 else min(configured, self.limit)
