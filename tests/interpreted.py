"""The modules setup.py compiles with mypyc (pyproject.toml, ``[tool.mxspool] compiled``), and
a switch to import them from their .py source instead.

With ``MXSPOOL_INTERPRETED=1`` (tests/__init__.py installs the finder before anything imports
mxspool) the suite runs those modules interpreted although their compiled forms are installed:
what a build without a C compiler runs. ``.ci/run`` runs the SMTP core's and listener's tests
that way too, so the fallback stays tested.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
ENABLED = os.environ.get("MXSPOOL_INTERPRETED") == "1"


def listed() -> dict[str, Path]:
    """Module name -> source file, for every compiled module."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        paths: list[str] = tomllib.load(f)["tool"]["mxspool"]["compiled"]
    return {p.removeprefix("src/").removesuffix(".py").replace("/", "."): ROOT / p for p in paths}


class _SourceFinder(importlib.abc.MetaPathFinder):
    def __init__(self, modules: dict[str, Path]) -> None:
        self.modules = modules

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        source = self.modules.get(fullname)
        return None if source is None else importlib.util.spec_from_file_location(fullname, source)


def install() -> None:
    """Import the compiled modules from source from now on (before any of them is imported)."""
    modules = listed()
    already = sorted(name for name in modules if name in sys.modules)
    if already:
        raise RuntimeError(f"MXSPOOL_INTERPRETED=1 came too late: {already} already imported")
    sys.meta_path.insert(0, _SourceFinder(modules))
