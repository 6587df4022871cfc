from __future__ import annotations

from collections.abc import Iterator

import pytest

from mxspool.smtp import data

SCANNERS = ["c", "python"] if data.ACCELERATED else ["python"]


@pytest.fixture(params=SCANNERS)
def scanner(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run a test once with the C DATA scanner (when built) and once with the Python one."""
    monkeypatch.setattr(data, "ACCELERATED", request.param == "c")
    yield request.param
