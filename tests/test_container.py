"""deploy/Containerfile: linted statically always, built when podman can get the base image;
its HEALTHCHECK script run against a real node."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.admin.conftest import AdminNode

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
BASES = ("docker.io/library/debian:12", "docker.io/library/python:3.11-slim")
IMAGE = "localhost/mxspool-test:latest"


# -- static lint -------------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, args = whole.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def lint(text: str) -> list[str]:
    """What is wrong with a Containerfile for mxspool, as readable lines (empty: fine)."""
    problems = []
    steps = instructions(text)
    froms = [i for i, (keyword, _) in enumerate(steps) if keyword == "FROM"]
    if not froms:
        return ["no FROM"]
    for index in froms:
        image = steps[index][1].split()[0]
        if image not in BASES:
            problems.append(f"base {image} is not one of {BASES}")
    final = steps[froms[-1] :]
    users = [args for keyword, args in final if keyword == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the final stage runs as root (no USER, or USER root)")
    volumes = " ".join(args for keyword, args in final if keyword == "VOLUME")
    if "/var/lib/mxspool" not in volumes:
        problems.append("no VOLUME for the spool /var/lib/mxspool")
    exposed = {p for keyword, args in final if keyword == "EXPOSE" for p in args.split()}
    if not {"25", "8025"} <= exposed:
        problems.append(f"EXPOSE {sorted(exposed)} lacks 25 or 8025")
    checks = [args for keyword, args in final if keyword == "HEALTHCHECK"]
    if not checks or "CMD" not in checks[-1]:
        problems.append("no HEALTHCHECK ... CMD")
    for keyword, args in steps:
        if keyword == "COPY" and not args.startswith("--from"):
            for source in shlex.split(args)[:-1]:
                if not (ROOT / source).exists():
                    problems.append(f"COPY source {source} missing from the build context")
    return problems


def test_the_containerfile_lints_clean() -> None:
    text = CONTAINERFILE.read_text()
    assert lint(text) == []
    final = instructions(text)[[k for k, _ in instructions(text)].index("FROM", 1) :]
    assert ("CMD", '["mxspool", "serve"]') in final
    assert "healthcheck.py" in next(args for k, args in final if k == "HEALTHCHECK")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "**/*.so" in ignored


def test_the_lint_catches_mistakes() -> None:
    # Positive control: each rule fires on a Containerfile that breaks it.
    text = CONTAINERFILE.read_text()
    assert any("root" in p for p in lint(text.replace("USER mxspool:mxspool", "USER root")))
    assert any("root" in p for p in lint(text.replace("USER mxspool:mxspool", "")))
    assert any("VOLUME" in p for p in lint(text.replace('VOLUME ["/var/lib/mxspool"]', "")))
    assert any("EXPOSE" in p for p in lint(text.replace("EXPOSE 25 8025", "EXPOSE 8025")))
    assert any("HEALTHCHECK" in p for p in lint(text.replace("HEALTHCHECK", "#")))
    assert any("missing" in p for p in lint(text.replace("COPY src ./src", "COPY nope ./src")))
    assert any("base" in p for p in lint(text.replace("debian:12", "alpine:3", 1)))


# -- the healthcheck script against a real node -------------------------------------------------


def healthcheck(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "MXSPOOL_CONFIG": str(config)},
    )


def test_healthcheck_script(tmp_path: Path) -> None:
    node = AdminNode(tmp_path)
    node.start()
    try:
        healthy = healthcheck(node.config)
        assert (healthy.returncode, healthy.stdout.strip()) == (0, "healthy"), healthy.stdout
    finally:
        node.stop()
    down = healthcheck(node.config)
    assert down.returncode == 1 and "unreachable" in down.stdout
    missing = healthcheck(tmp_path / "nope.toml")
    assert missing.returncode == 1 and "cannot read the configuration" in missing.stdout


# -- a real build ------------------------------------------------------------------------------


def podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def base_images_or_skip() -> None:
    """Skip (saying why) unless podman runs, every base image is here or can be pulled, and
    podman can start a container from it."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (apt-get install podman)")
    if podman("info").returncode != 0:
        pytest.skip("podman cannot run here")
    bases = sorted({args.split()[0] for k, args in instructions(CONTAINERFILE.read_text())
                    if k == "FROM" and "/" in args.split()[0]})  # fmt: skip
    for base in bases:
        if podman("image", "exists", base).returncode == 0:
            continue
        pulled = podman("pull", "--quiet", base, timeout=300)
        if pulled.returncode != 0:
            reason = (pulled.stderr.strip().splitlines() or ["?"])[-1]
            pytest.skip(f"base image {base} not available and cannot be pulled: {reason}")
    # RUN steps need podman to start containers, which some sandboxes (nested, hybrid cgroups,
    # no setrlimit) refuse although podman itself works.
    ran = podman("run", "--rm", "--pull=never", "--network=none", bases[0], "/bin/true")
    if ran.returncode != 0:
        reason = (ran.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"podman cannot run containers here: {reason}")


@pytest.mark.slow
def test_the_image_builds() -> None:
    base_images_or_skip()
    built = podman(
        "build", "--pull=never", "-f", str(CONTAINERFILE), "-t", IMAGE, str(ROOT), timeout=1200
    )
    assert built.returncode == 0, built.stderr[-3000:]
    try:
        inspected = podman("image", "inspect", "--format", "{{json .Config}}", IMAGE)
        config: dict[str, Any] = json.loads(inspected.stdout)
        assert config["User"] == "mxspool:mxspool"
        assert "/var/lib/mxspool" in config["Volumes"]
        assert {"25/tcp", "8025/tcp"} <= set(config["ExposedPorts"])
        version = podman("run", "--rm", IMAGE, "mxspool", "--version")
        assert version.returncode == 0 and "mxspool" in version.stdout, version.stderr
        uid = podman("run", "--rm", IMAGE, "id", "-u")
        assert uid.stdout.strip() == "10025"
    finally:
        podman("rmi", "--force", IMAGE)
