"""The webhook signature: HMAC-SHA256 over the timestamp and the body, with the target's secret.

Headers sent with every attempt::

    X-Mxspool-Timestamp: 1738324800            (Unix seconds when this attempt was made)
    X-Mxspool-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>

The timestamp is inside the MAC so a captured request cannot be replayed later: a receiver
checks the MAC and refuses a timestamp more than a few minutes from its clock (``verify``
does both; README "Notifications" has the same check in five lines of Python).
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Mxspool-Signature"
TIMESTAMP_HEADER = "X-Mxspool-Timestamp"
TOLERANCE = 300.0
"""Seconds a receiver should accept between the timestamp and its clock."""


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The X-Mxspool-Signature value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secret: bytes,
    timestamp: str,
    body: bytes,
    signature: str,
    *,
    now: float | None = None,
    tolerance: float = TOLERANCE,
) -> bool:
    """Whether ``signature`` is right for ``body`` and ``timestamp`` is recent enough."""
    if not timestamp.isdigit():
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), signature)
