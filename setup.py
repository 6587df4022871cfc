"""The compiled parts, all optional: where a C compiler (or SQLite's header) is missing the build
goes on without them and mxspool runs the pure-Python equivalents or the same source
interpreted (slower, otherwise identical). The mypyc modules are tried only where a compiler is
found and mypyc accepts the source; a compiler that then fails on them fails the build, since a
half-built set would not import.

- ``mxspool.smtp._scan``: the DATA scanner's inner loops (src/mxspool/smtp/_scan.c);
- ``mxspool.store._groupcommit``: the SQLite store's commit thread for accepted messages, which
  never takes the GIL, and its write-coalescing VFS (src/mxspool/store/_groupcommit.c and
  _coalesce.c; needs sqlite3.h and OpenSSL's headers, Debian libsqlite3-dev and libssl-dev: the
  thread computes each body's SHA-256 with OpenSSL, off the event loop);
- the SMTP intake's per-connection path (the modules listed under ``[tool.mxspool] compiled``
  in pyproject.toml), compiled to C with mypyc from their own type-annotated source: the same
  code, without the interpreter's dispatch (mypy, which carries mypyc, is a build requirement).
  ``MXSPOOL_PURE_PYTHON=1`` leaves them interpreted (while editing them, say: a compiled module
  shadows its .py until the next build, which ``make`` runs when a listed source changes).

Everything else about the package is in pyproject.toml.
"""

import glob
import os
import shutil
import sys
import tomllib

from setuptools import Extension, setup

GROUP = "mxspool"  # mypyc's shared library for them all: mxspool__mypyc
# The project's mypy configuration, less what an isolated build cannot have: the dependencies
# (their types become Any, which the compiled code only passes through) and the errors of the
# modules it imports but does not compile (`make lint` checks every module against them all).
MYPY_ARGS = [
    "--config-file",
    "pyproject.toml",
    "--ignore-missing-imports",
    "--follow-imports=silent",
]


def compiled_modules() -> list[Extension]:
    """mypyc's extensions for the listed modules, or none (and why, on stderr)."""
    with open("pyproject.toml", "rb") as f:
        paths: list[str] = tomllib.load(f)["tool"]["mxspool"]["compiled"]
    why = ""
    if os.environ.get("MXSPOOL_PURE_PYTHON") == "1":
        why = "MXSPOOL_PURE_PYTHON=1"
    elif shutil.which(os.environ.get("CC", "cc")) is None:
        why = "no C compiler"
    else:
        try:
            from mypyc.build import mypycify

            return list(mypycify([*MYPY_ARGS, *paths], opt_level="3", group_name=GROUP))
        except ImportError:
            why = "mypy is not installed"
        except (Exception, SystemExit) as exc:  # mypyc exits on a type error it cannot compile
            why = f"mypyc failed: {exc!r}"
    print(f"mxspool: the intake runs interpreted ({why})", file=sys.stderr)
    _remove_compiled(paths)
    return []


def _remove_compiled(paths: list[str]) -> None:
    """An earlier build's compiled modules, left in src/ by an editable install, would shadow
    the sources they were built from: remove them."""
    for path in paths:
        for stale in glob.glob(path.removesuffix(".py") + ".*.so"):
            os.remove(stale)
    for stale in glob.glob(f"src/{GROUP}__mypyc.*.so"):
        os.remove(stale)


setup(
    ext_modules=[
        Extension("mxspool.smtp._scan", ["src/mxspool/smtp/_scan.c"], optional=True),
        Extension(
            "mxspool.store._groupcommit",
            ["src/mxspool/store/_groupcommit.c", "src/mxspool/store/_coalesce.c"],
            depends=["src/mxspool/store/_coalesce.h"],
            libraries=["sqlite3", "crypto"],
            optional=True,
        ),
        *compiled_modules(),
    ]
)
