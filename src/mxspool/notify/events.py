"""What a notification says: the event, its facts, and the forms it is sent in.

One :class:`Event` is rendered as JSON for webhooks (the documented schema below) and as a
plain text message for email, so both say the same facts. The schema::

    {"id": "...", "event": "backlog_high", "time": "2025-01-31T12:00:00Z",
     "node": "mx1.example.net", "domain": "example.com" | null,
     "summary": "one line for humans", "details": {...}}

``id`` is stable for one notification (every retry carries it, so a receiver de-duplicates on
it); for release events it derives from the domain and its release time, so the same release
seen by two nodes or after a restart has the same id.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, get_args

from mxspool.config import NotifyEvent

EVENTS: tuple[str, ...] = get_args(NotifyEvent)
"""Every event name: the ones ``[[notify]] events`` accepts (config.NotifyEvent)."""


def iso(at: float) -> str:
    """A Unix time as UTC ISO 8601 with a Z, to the second."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_id(*parts: object) -> str:
    """A stable id from the facts that identify one occurrence."""
    text = "\0".join(str(part) for part in parts)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Event:
    event: str
    node: str
    summary: str
    domain: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", event_id(self.event, self.domain, self.node, self.at))

    def payload(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "event": self.event,
            "time": iso(self.at),
            "node": self.node,
            "domain": self.domain,
            "summary": self.summary,
            "details": self.details,
        }

    def json_body(self) -> bytes:
        """The webhook body: compact JSON, UTF-8, keys in schema order."""
        return json.dumps(self.payload(), ensure_ascii=False, separators=(",", ":")).encode()

    def subject(self) -> str:
        where = self.domain or self.node
        return f"[mxspool] {self.event}: {where}"

    def text(self) -> str:
        """The email body: the same facts as the JSON, one per line."""
        lines = [self.summary, ""]
        for key, value in self.payload().items():
            if key not in ("details", "summary"):
                lines.append(f"{key}: {'-' if value is None else value}")
        for key, value in self.details.items():
            lines.append(f"{key}: {value}")
        return "\n".join(lines) + "\n"


def trial_event(node: str, target: str) -> Event:
    return Event(
        "test",
        node,
        f"mxspool notification test from {node} to {target}: if you read this, it works",
        details={"target": target},
    )
