"""psycopg is an extra (``mxspool[postgres]``): a SQLite node runs without it, and a
postgresql:// store without it fails with a message that names the extra.

psycopg is made unimportable for the subprocesses by a directory on PYTHONPATH holding a
``psycopg`` module that raises ModuleNotFoundError, as a missing package would.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MXSPOOL, Spooler
from tests.waiting import wait_until

EXTRA_HINT = "pip install 'mxspool[postgres]'"


@pytest.fixture
def no_psycopg(tmp_path: Path) -> dict[str, str]:
    """Environment in which ``import psycopg`` (and psycopg_pool) fails."""
    hide = tmp_path / "hide-psycopg"
    hide.mkdir()
    for name in ("psycopg", "psycopg_pool"):
        (hide / f"{name}.py").write_text(
            f"raise ModuleNotFoundError({f'No module named {name!r}'!r}, name={name!r})\n"
        )
    path = os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path}


def mxspool(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MXSPOOL, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_the_hiding_works(no_psycopg: dict[str, str]) -> None:
    # Positive control: psycopg is installed here, and the environment hides it.
    code = "import psycopg"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
    hidden = subprocess.run(
        [sys.executable, "-c", code], env=no_psycopg, capture_output=True, text=True, check=False
    )
    last = hidden.stderr.strip().splitlines()[-1]
    assert hidden.returncode == 1 and last == "ModuleNotFoundError: No module named 'psycopg'"


def test_postgres_url_without_psycopg_names_the_extra(
    no_psycopg: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "pg.toml"
    config.write_text('[store]\nurl = "postgresql://mxspool@127.0.0.1:1/none"\n')

    # A management command, from python -c through the CLI's entry point.
    code = f"import sys; sys.argv = ['mxspool', '--config', {str(config)!r}, 'domain', 'list']\n"
    code += "from mxspool.cli import main; main()"
    direct = subprocess.run(
        [sys.executable, "-c", code],
        env=no_psycopg,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert direct.returncode == 2 and EXTRA_HINT in direct.stderr, direct.stderr
    assert "Traceback" not in direct.stderr

    serve = mxspool(no_psycopg, "--config", str(config), "serve")
    assert serve.returncode == 2
    assert EXTRA_HINT in serve.stderr and "Traceback" not in serve.stderr

    # Control: with psycopg importable the same URL gets past the import (and then fails on
    # the connection to port 1, with another message).
    reachable = mxspool(dict(os.environ), "--config", str(config), "status")
    assert reachable.returncode != 0 and EXTRA_HINT not in reachable.stderr


def test_sqlite_node_runs_without_psycopg(
    no_psycopg: dict[str, str], spooler_factory: object
) -> None:
    node: Spooler = spooler_factory()  # type: ignore[operator]
    added = mxspool(
        no_psycopg,
        "--config",
        str(node.config),
        "domain",
        "add",
        "example.test",
        "--route",
        "127.0.0.1:2526",
        "--hold",
    )
    assert added.returncode == 0, added.stderr
    node.start(extra_env={"PYTHONPATH": no_psycopg["PYTHONPATH"]})
    with smtplib.SMTP("127.0.0.1", node.port, timeout=10) as client:
        client.sendmail("a@src.test", ["b@example.test"], b"Subject: sqlite\r\n\r\nbody\r\n")

    def held() -> bool:
        status = mxspool(no_psycopg, "--config", str(node.config), "status", "--json")
        assert status.returncode == 0, status.stderr
        return '"held": 1' in status.stdout

    wait_until(held, 15, "the message held, seen by status without psycopg")
    assert node.proc is not None and node.proc.poll() is None
    node.stop()
    assert node.proc.returncode == 0
