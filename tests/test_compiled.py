"""The intake's modules compiled with mypyc (setup.py; pyproject.toml, ``[tool.mxspool]
compiled``): built, and built from the source that is there now.

A compiled module shadows its .py: after an edit without a rebuild, Python would run the old
code. ``make`` rebuilds when a listed source changes; running pytest directly does not, so this
test says so. With MXSPOOL_REQUIRE_SPEEDUPS=1 (CI) an interpreted module fails here instead of
skipping.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

from tests import interpreted

LISTED = interpreted.listed()


def test_the_list_names_modules_that_exist() -> None:
    assert LISTED and all(source.is_file() for source in LISTED.values())
    assert {"mxspool.intake.listener", "mxspool.smtp.server"} <= set(LISTED)


@pytest.mark.skipif(not interpreted.ENABLED, reason="MXSPOOL_INTERPRETED=1 only")
@pytest.mark.parametrize("name", sorted(LISTED))
def test_with_mxspool_interpreted_a_listed_module_runs_from_its_source(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__file__ == str(LISTED[name])


@pytest.mark.skipif(interpreted.ENABLED, reason="MXSPOOL_INTERPRETED=1 imports the sources")
@pytest.mark.parametrize("name", sorted(LISTED))
def test_a_listed_module_is_compiled_from_its_current_source(name: str) -> None:
    module = importlib.import_module(name)
    built = module.__file__ or ""
    if not built.endswith(".so"):
        if os.environ.get("MXSPOOL_REQUIRE_SPEEDUPS") == "1":
            pytest.fail(
                f"{name} is not compiled ({built}): the build found no C compiler, mypyc "
                "failed (pip install -v -e . shows why) or it ran with MXSPOOL_PURE_PYTHON=1; "
                "fix that and run make, or unset MXSPOOL_REQUIRE_SPEEDUPS"
            )
        pytest.skip(f"{name} runs interpreted (MXSPOOL_REQUIRE_SPEEDUPS=1 fails here)")
    source = LISTED[name]
    if Path(built).resolve().parent == source.resolve().parent:  # an editable install
        assert os.path.getmtime(built) >= os.path.getmtime(source), (
            f"{built} is older than {source}: Python runs the old code; rebuild with make (or "
            "pip install -e .), or install with MXSPOOL_PURE_PYTHON=1 to run it interpreted"
        )
