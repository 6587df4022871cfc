"""deploy/Containerfile: linted statically always, built when podman can get the base image;
its HEALTHCHECK script run against a real node."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.admin.conftest import AdminNode
from tests.conftest import free_ports, wait_for_port
from tests.waiting import wait_until

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
    """Skip (saying why; fail instead with MXSPOOL_REQUIRE_CONTAINER=1, as CI sets after
    .ci/container-base made the base image) unless we are root, podman works, and every base
    image is here or can be pulled."""
    stop = pytest.fail if os.environ.get("MXSPOOL_REQUIRE_CONTAINER") == "1" else pytest.skip
    if shutil.which("podman") is None:
        stop("podman is not installed (apt-get install podman)")
    if os.geteuid() != 0:
        stop("the image build test runs as root (podman build --isolation chroot, chroot)")
    if podman("info").returncode != 0:
        stop("podman cannot run here")
    bases = sorted({args.split()[0] for k, args in instructions(CONTAINERFILE.read_text())
                    if k == "FROM" and "/" in args.split()[0]})  # fmt: skip
    for base in bases:
        if podman("image", "exists", base).returncode == 0:
            continue
        pulled = podman("pull", "--quiet", base, timeout=300)
        if pulled.returncode != 0:
            reason = (pulled.stderr.strip().splitlines() or ["?"])[-1]
            stop(f"base image {base} not available and cannot be pulled: {reason} "
                 "(.ci/container-base builds it with debootstrap)")  # fmt: skip


def build() -> subprocess.CompletedProcess[str]:
    """``podman build`` of deploy/Containerfile. Docker format: OCI images drop HEALTHCHECK.
    RUN steps in a chroot, since sandboxes such as this CI refuse the OCI runtime's setrlimit
    and hybrid cgroups. The host's CA bundle goes to pip (PIP_CERT): a TLS-intercepting proxy
    that the host trusts is then trusted in the build too."""
    args = ["build", "--format", "docker", "--isolation", "chroot", "--pull=never"]
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.exists():
        args += ["-v", f"{bundle}:/run/host-ca.pem:ro", "--build-arg", "PIP_CERT=/run/host-ca.pem"]
    return podman(*args, "-f", str(CONTAINERFILE), "-t", IMAGE, str(ROOT), timeout=1500)


class Rootfs:
    """A container of the built image, its file system mounted and commands run in it with
    chroot as the image's user, with the image's environment and working directory: what
    ``podman run`` would do, where podman cannot start containers."""

    def __init__(self, image: str, config: dict[str, Any]) -> None:
        created = podman("create", "--pull=never", image)
        assert created.returncode == 0, created.stderr
        self.container = created.stdout.strip()
        mounted = podman("mount", self.container)
        assert mounted.returncode == 0, mounted.stderr
        self.root = Path(mounted.stdout.strip())
        self.env = dict(item.split("=", 1) for item in config["Env"])
        self.workdir = config["WorkingDir"]
        self.user = config["User"]
        self.binds: list[Path] = []
        for name in ("proc", "dev"):  # the forkserver and SQLite want /proc, /dev/shm, /dev/null
            target = self.root / name
            subprocess.run(["mount", "--rbind", f"/{name}", str(target)], check=True)
            self.binds.append(target)

    def uid(self) -> str:
        user = self.user.split(":")[0]
        for line in (self.root / "etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == user:
                return fields[2]
        raise AssertionError(f"user {user} not in the image's /etc/passwd")

    def command(self, *argv: str) -> list[str]:
        uid = self.uid()
        inner = f"cd {shlex.quote(self.workdir)} && exec {shlex.join(argv)}"
        return ["chroot", f"--userspec={uid}:{uid}", str(self.root), "/bin/sh", "-c", inner]

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self.env,
        )

    def start(self, *argv: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen(
                self.command(*argv), stdout=out, stderr=subprocess.STDOUT, env=self.env
            )

    def close(self) -> None:
        for target in reversed(self.binds):
            subprocess.run(["umount", "--recursive", "--lazy", str(target)], check=False)
        podman("umount", self.container)
        podman("rm", "--force", self.container)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the build compiles the intake (mypyc): minutes on two cores
def test_the_image_builds_and_serves(tmp_path: Path) -> None:
    base_images_or_skip()
    built = build()
    assert built.returncode == 0, built.stderr[-3000:]
    try:
        inspected = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
        config: dict[str, Any] = inspected["Config"]
        assert config["User"] == "mxspool:mxspool"
        assert "/var/lib/mxspool" in config["Volumes"]
        assert {"25/tcp", "8025/tcp"} <= set(config["ExposedPorts"])
        assert "healthcheck.py" in " ".join(inspected["Healthcheck"]["Test"])  # docker format
        assert config["Cmd"] == ["mxspool", "serve"]
        rootfs = Rootfs(IMAGE, config)
        try:
            serve_in_the_image(rootfs, tmp_path)
        finally:
            rootfs.close()
    finally:
        podman("rmi", "--force", IMAGE)


def serve_in_the_image(rootfs: Rootfs, tmp_path: Path) -> None:
    """The README's recipe inside the image, as its non-root user: init, serve, a message,
    status, the HEALTHCHECK, and a clean stop on SIGTERM."""
    assert rootfs.uid() == "10025"
    version = rootfs.run("mxspool", "--version")
    assert version.returncode == 0 and "mxspool" in version.stdout, version.stderr
    assert rootfs.run("id", "-u").stdout.strip() == "10025"
    made = rootfs.run("mxspool", "init", "/etc/mxspool", "--data-dir", "/var/lib/mxspool")
    assert made.returncode == 0, made.stderr
    port, admin_port = free_ports(2)
    config = rootfs.root / "etc/mxspool/mxspool.toml"
    text = config.read_text()
    # the starter's SMTP listen list (all addresses, port 25) becomes one loopback port
    text = re.sub(r"^listen = \[.*\]$", f'listen = ["127.0.0.1:{port}"]', text, count=1, flags=re.M)
    text = text.replace('listen = "127.0.0.1:8025"', f'listen = "127.0.0.1:{admin_port}"')
    config.write_text(text)
    added = rootfs.run(
        "mxspool", "domain", "add", "example.test", "--route", "127.0.0.1:9", "--hold"
    )
    assert added.returncode == 0, added.stderr
    serve = rootfs.start("mxspool", "serve", log=tmp_path / "serve.log")
    try:
        try:
            wait_for_port(port, proc=serve)
        except RuntimeError as exc:
            raise AssertionError((tmp_path / "serve.log").read_text()[-3000:]) from exc
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            refused = client.sendmail(
                "a@src.test", ["u@example.test"], b"Subject: image\r\n\r\nhi\r\n"
            )
        assert refused == {}
        status = json.loads(rootfs.run("mxspool", "status", "--json").stdout)
        held = {row["domain"]: row["held"] for row in status["domains"]}
        assert held["example.test"] == 1
        # As the runtime does (HEALTHCHECK --retries), ask again while the node may still be
        # becoming ready (its delivery loop's first turn); the last answer is shown.
        checks: list[subprocess.CompletedProcess[str]] = []

        def healthy() -> bool:
            checks.append(rootfs.run("/opt/mxspool/bin/python", "/opt/mxspool/healthcheck.py"))
            return checks[-1].returncode == 0

        with contextlib.suppress(TimeoutError):
            wait_until(healthy, 20, "the image's healthcheck to pass")
        check = checks[-1]
        assert (check.returncode, check.stdout.strip()) == (0, "healthy"), check.stdout
        spool = rootfs.root / "var/lib/mxspool/spool.db"
        assert spool.stat().st_uid == 10025  # the spool belongs to the image's user
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            code = serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            serve.kill()
            raise
    assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]
