"""The compiled parts, both optional: where a C compiler (or SQLite's header) is missing the build
goes on without them and mxspool uses the pure-Python equivalents (slower, otherwise identical).

- ``mxspool.smtp._scan``: the DATA scanner's inner loops (src/mxspool/smtp/_scan.c);
- ``mxspool.store._groupcommit``: the SQLite store's commit thread for accepted messages, which
  never takes the GIL, and its write-coalescing VFS (src/mxspool/store/_groupcommit.c and
  _coalesce.c; needs sqlite3.h and OpenSSL's headers, Debian libsqlite3-dev and libssl-dev: the
  thread computes each body's SHA-256 with OpenSSL, off the event loop).

Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

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
    ]
)
