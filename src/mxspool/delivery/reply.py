"""An SMTP reply from the next hop, as the ledger keeps it."""

from __future__ import annotations

import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str

    def __str__(self) -> str:
        # Multi-line replies are kept on one line so the ledger's CSV rows stay one line each.
        return f"{self.code} {' '.join(self.text.splitlines())}".rstrip()

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def enhanced_status(self) -> str | None:
        """The RFC 3463 status code at the start of the text, e.g. "5.1.1", if present."""
        match = _ENHANCED.match(self.text)
        return ".".join(match.groups()) if match else None
