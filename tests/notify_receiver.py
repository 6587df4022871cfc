"""A webhook receiver for the notification tests: a real HTTP server on 127.0.0.1 that checks
every request's signature with its own secret and answers with scripted status codes."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mxspool.notify.signature import verify


@dataclass
class Request:
    headers: dict[str, str]
    body: bytes
    signed: bool
    status: int
    at: float

    @property
    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


class Receiver:
    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.requests: list[Request] = []
        self.script: list[int] = []
        """Status codes for the next requests, in order (then 200; 401 for a bad signature)."""
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {key.lower(): value for key, value in self.headers.items()}
                signed = verify(
                    receiver.secret,
                    headers.get("x-mxspool-timestamp", ""),
                    body,
                    headers.get("x-mxspool-signature", ""),
                )
                with receiver.lock:
                    status = receiver.script.pop(0) if receiver.script else 200
                    if not signed:
                        status = 401
                    receiver.requests.append(Request(headers, body, signed, status, time.time()))
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> Receiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def accepted(self, event: str | None = None) -> list[dict[str, Any]]:
        """Payloads answered with 2xx (what the receiver took), optionally of one event."""
        with self.lock:
            done = [r.payload for r in self.requests if 200 <= r.status < 300]
        return [p for p in done if event is None or p["event"] == event]

    def tries(self, event: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.payload["event"] == event]
