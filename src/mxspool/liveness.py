"""What the parts of a running node say about themselves, for ``GET /readyz``.

The parts of a node run on one event loop and do not import each other (the admin plane sits
beside the intake and the delivery engine, not above them), so they leave their signs of life
here: the service sets ``listeners`` once the SMTP sockets accept, the delivery scheduler calls
``beat("delivery")`` on each turn of its loop. The readiness check reads them. One process is
one node, so one module-level ``NODE`` is the honest shape; tests of one part reset it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Liveness:
    listeners: Callable[[], bool] | None = None
    """True while every SMTP listener accepts; None before they are started (or after)."""
    beats: dict[str, float] = field(default_factory=dict)
    """Loop name -> monotonic time of its last turn."""

    def beat(self, name: str) -> None:
        self.beats[name] = time.monotonic()

    def age(self, name: str) -> float | None:
        """Seconds since ``name`` last beat; None if it never did."""
        last = self.beats.get(name)
        return None if last is None else time.monotonic() - last


NODE = Liveness()
