"""The power-loss shim, compiled once per test session into the session's temporary tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.powerloss.harness import build_shim


@pytest.fixture(scope="session")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shim(tmp_path_factory.mktemp("powerloss-build"))
