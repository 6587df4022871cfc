"""``node_lost``: a cluster node that was connected is not seen for ``node_timeout``.

Fed the set of node names ``store.presence`` sees on every look. A node is remembered from
the first time this (leader) node sees it; when it has been absent for the timeout, one
``node_lost`` is told; it is told again only after the node came back and went away again.
A node that was never seen by the current leader (it died before this leader started) cannot
be missed: the limitation is in the README.
"""

from __future__ import annotations

from collections.abc import Iterable

from mxspool.notify.events import Event, event_id, iso


class NodeWatch:
    def __init__(self, node: str, timeout: float) -> None:
        self.node = node
        self.timeout = timeout
        self.last_seen: dict[str, float] = {}
        self._lost: set[str] = set()

    def observe(self, seen: Iterable[str], now: float) -> list[Event]:
        for name in seen:
            self.last_seen[name] = now
            self._lost.discard(name)
        events = []
        for name, at in sorted(self.last_seen.items()):
            if name in self._lost or now - at < self.timeout:
                continue
            self._lost.add(name)
            events.append(
                Event(
                    "node_lost",
                    self.node,
                    f"node {name} not seen for {now - at:.0f} s (last seen {iso(at)})",
                    None,
                    {"lost_node": name, "last_seen": iso(at), "not_seen_for_s": round(now - at)},
                    at=now,
                    id=event_id("node_lost", name, at),
                )
            )
        return events
