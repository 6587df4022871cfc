"""A webhook target: the event as JSON in an HTTP POST, signed (see ``signature``).

One attempt is one POST with the target's timeout for the whole exchange. A 2xx answer is
success; 408, 429 and 5xx, timeouts and connection errors may be retried; any other answer
(a 4xx: wrong URL, refused signature) is final, since the same request would get it again.
Redirects are not followed: a POST that moved is a configuration to fix, not to guess.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import httpx

from mxspool import __version__
from mxspool.config import NotifyTarget
from mxspool.notify.events import Event
from mxspool.notify.signature import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from mxspool.notify.targets import RetryPolicy, SendFailed, policy_of, wanted

RETRIED_STATUSES = frozenset({408, 429})
ANSWER_EXCERPT = 200
"""Characters of a refusing answer's body quoted in the log."""


class WebhookTarget:
    kind = "webhook"

    def __init__(self, entry: NotifyTarget, secret: bytes, backlog_threshold: int) -> None:
        self.entry = entry
        self.name = entry.name or urlsplit(entry.url).netloc
        self.policy: RetryPolicy = policy_of(entry)
        self.backlog_threshold = backlog_threshold
        self._secret = secret
        self._client: httpx.AsyncClient | None = None

    def wants(self, event: Event) -> bool:
        return wanted(self.entry, event, self.backlog_threshold)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.entry.timeout),
                follow_redirects=False,
                headers={"User-Agent": f"mxspool/{__version__}"},
            )
        return self._client

    def request_headers(self, event: Event, body: bytes, now: float) -> dict[str, str]:
        timestamp = int(now)
        return {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(self._secret, timestamp, body),
            "X-Mxspool-Event": event.event,
            "X-Mxspool-Event-Id": event.id,
        }

    async def attempt(self, event: Event) -> str:
        body = event.json_body()
        headers = self.request_headers(event, body, time.time())
        try:
            answer = await self._http().post(self.entry.url, content=body, headers=headers)
        except httpx.TimeoutException:
            raise SendFailed(
                f"no answer from {self.entry.url} within {self.entry.timeout:g} s", retry=True
            ) from None
        except httpx.HTTPError as exc:
            raise SendFailed(f"{self.entry.url}: {exc or type(exc).__name__}", retry=True) from None
        code = answer.status_code
        if 200 <= code < 300:
            return f"HTTP {code}"
        excerpt = answer.text[:ANSWER_EXCERPT].replace("\n", " ")
        retry = code >= 500 or code in RETRIED_STATUSES
        raise SendFailed(f"{self.entry.url} answered HTTP {code}: {excerpt}", retry=retry)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
