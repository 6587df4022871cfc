"""Container HEALTHCHECK for mxspool: exit 0 when the node's admin plane says it is healthy.

Asks ``GET /readyz`` (ready to take mail), falling back to ``GET /healthz`` on a node without
it, on the admin listener named by the configuration (``$MXSPOOL_CONFIG``, default
/etc/mxspool/mxspool.toml), with the first configured token, since off loopback the admin plane
wants one. Standard library only, and it does not import mxspool, so a check every 30 s costs
a few milliseconds of CPU. Exit status: 0 healthy, 1 not (the reason on stdout, which
``podman inspect`` / ``docker inspect`` show).
"""

from __future__ import annotations

import http.client
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

TIMEOUT = 5.0
WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def admin_target(admin: dict[str, Any]) -> tuple[str, int]:
    listen = str(admin.get("listen", "127.0.0.1:8025"))
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    return WILDCARDS.get(host, host), int(port)


def first_token(admin: dict[str, Any]) -> str | None:
    entries = [admin, *admin.get("tokens", [])]
    for entry in entries:
        if entry.get("token"):
            return str(entry["token"])
        if entry.get("token_file"):
            text = Path(entry["token_file"]).read_text(encoding="utf-8").strip()
            return text.splitlines()[0].strip() if text else None
    return None


def check(config_path: str) -> str | None:
    """None when healthy, else why not."""
    try:
        config = tomllib.loads(Path(config_path).read_text(encoding="utf-8"))
        admin = config.get("admin", {})
        host, port = admin_target(admin)
        token = first_token(admin)
    except (OSError, ValueError) as exc:
        return f"cannot read the configuration {config_path}: {exc}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for path in ("/readyz", "/healthz"):
        connection = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        try:
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            body = response.read(500).decode("utf-8", "replace")
        except OSError as exc:
            return f"admin plane at {host}:{port} unreachable: {exc}"
        finally:
            connection.close()
        if response.status == 404 and path == "/readyz":
            continue  # an older node: /healthz only
        if response.status == 200:
            return None
        return f"{path} answered {response.status}: {body.strip()}"
    return "no health endpoint answered"


def main() -> int:
    reason = check(os.environ.get("MXSPOOL_CONFIG", "/etc/mxspool/mxspool.toml"))
    if reason is None:
        print("healthy")
        return 0
    print(reason)
    return 1


if __name__ == "__main__":
    sys.exit(main())
