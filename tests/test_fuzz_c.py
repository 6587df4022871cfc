"""A short libFuzzer run over the C modules, with AddressSanitizer and UBSan (fuzz/run.sh).

The DATA scanner (_scan.c) must give the Python reference's answers for any input and any
chunking; the commit thread (_groupcommit.c, _coalesce.c) must store every value it takes
byte-exact. Any crash, sanitizer report or mismatch fails the test, with the log's end and
the path of the input that caused it. Needs clang with its sanitizer runtimes (Debian:
clang libclang-rt-14-dev); without clang it skips, unless MXSPOOL_REQUIRE_FUZZ=1 (CI).
The longer run for development is `fuzz/run.sh 600` (README, "Fuzzing").
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECONDS = 10  # per target; the two run side by side
# Far below what a healthy run does in SECONDS (~20,000 and ~300): a positive control that the
# targets really ran, rather than failing to start and saying nothing.
MIN_INPUTS = {"scan": 1000, "commit": 20}


@pytest.mark.slow
def test_the_c_modules_survive_a_short_fuzz_run() -> None:
    if shutil.which(os.environ.get("CC", "clang")) is None:
        message = "clang is not installed (Debian: apt-get install clang libclang-rt-14-dev)"
        if os.environ.get("MXSPOOL_REQUIRE_FUZZ") == "1":
            pytest.fail(message)
        pytest.skip(message)
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", str(ROOT / "fuzz" / "run.sh"), str(SECONDS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=SECONDS + 240,  # first build included
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"fuzz/run.sh failed:\n{output[-12000:]}"
    for target, minimum in MIN_INPUTS.items():
        found = re.search(rf"{target}: no crash.*\((\d+) inputs", output)
        assert found, f"no result for {target}:\n{output[-4000:]}"
        assert int(found.group(1)) >= minimum, f"{target} ran only {found.group(1)} inputs"
