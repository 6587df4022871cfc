"""The one compiled part: the DATA scanner's inner loops (src/mxspool/smtp/_scan.c).

Optional: where no C compiler is available the build goes on without it and mxspool uses the
pure-Python reference implementation (slower on large messages, otherwise identical).
Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("mxspool.smtp._scan", ["src/mxspool/smtp/_scan.c"], optional=True),
    ]
)
