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
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _listed() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        paths: list[str] = tomllib.load(f)["tool"]["mxspool"]["compiled"]
    return paths


def test_the_list_names_modules_that_exist() -> None:
    paths = _listed()
    assert paths and all((ROOT / path).is_file() for path in paths)
    assert "src/mxspool/intake/listener.py" in paths and "src/mxspool/smtp/server.py" in paths


@pytest.mark.parametrize("path", _listed())
def test_a_listed_module_is_compiled_from_its_current_source(path: str) -> None:
    name = path.removeprefix("src/").removesuffix(".py").replace("/", ".")
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
    source = ROOT / path
    if Path(built).resolve().parent == source.resolve().parent:  # an editable install
        assert os.path.getmtime(built) >= os.path.getmtime(source), (
            f"{built} is older than {path}: Python runs the old code; rebuild with make (or "
            "pip install -e .), or install with "
            "MXSPOOL_PURE_PYTHON=1 to run it interpreted"
        )
