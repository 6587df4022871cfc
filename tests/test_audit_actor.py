"""Who the audit log names: the OS user (and sudo's caller) for the CLI, the token's name for
the API (``[[admin.tokens]]`` beside the single token settings), over real processes."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mxspool import actor
from mxspool.admin.auth import AdminConfigError, load_tokens
from mxspool.config import ConfigError, load_config
from tests.admin.conftest import AdminNode
from tests.conftest import MXSPOOL, Spooler

ME = pwd.getpwuid(os.geteuid()).pw_name


def cli(
    node: Spooler, *args: str, env: dict[str, str] | None = None, preexec: Any = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [MXSPOOL, "--config", str(node.config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
        preexec_fn=preexec,
    )
    assert result.returncode == 0, result.stderr
    return result


def audit(node: Spooler) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(cli(node, "audit", "--json").stdout)
    return entries


def actor_of(node: Spooler, target: str) -> str:
    return next(str(e["actor"]) for e in audit(node) if e["target"] == target)


def test_cli_actions_name_the_os_user(spooler_factory: Any) -> None:
    node: Spooler = spooler_factory()
    env = {k: v for k, v in os.environ.items() if k != "SUDO_USER"}
    # $USER and $LOGNAME are the shell's word; the audit log asks the password database.
    plain = {**env, "USER": "mallory", "LOGNAME": "mallory"}
    cli(node, "domain", "add", "plain.test", "--route", "mx.test", env=plain)
    cli(node, "domain", "add", "sudo.test", "--route", "mx.test", env={"SUDO_USER": "alice"})
    # A hostile SUDO_USER is cleaned and cut, never written raw.
    hostile = "bob\nforged line\t" + "x" * 500
    cli(node, "domain", "hold", "sudo.test", env={"SUDO_USER": hostile})

    entries = audit(node)
    actors = {(e["action"], e["target"]): e["actor"] for e in entries}
    assert actors[("domain.add", "plain.test")] == ME
    assert actors[("domain.add", "sudo.test")] == f"alice (sudo: {ME})"
    recorded = actors[("domain.hold", "sudo.test")]
    assert recorded.startswith("bob?forged?line") and recorded.endswith(f" (sudo: {ME})")
    assert len(recorded) <= actor.MAX_NAME + len(f" (sudo: {ME})")


def become_nobody() -> None:
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)


def nobody_can_run_mxspool() -> bool:
    """Root, and the venv's interpreter reachable by nobody (not under a 0700 /root)."""
    if os.geteuid() != 0:
        return False
    try:
        probe = subprocess.run(
            [MXSPOOL, "--version"], preexec_fn=become_nobody, capture_output=True, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


@pytest.mark.skipif(
    not nobody_can_run_mxspool(), reason="needs root and an mxspool that user nobody can run"
)
def test_cli_action_as_another_user(tmp_path: Path, spooler_factory: Any) -> None:
    node: Spooler = spooler_factory()
    nobody = pwd.getpwnam("nobody")
    os.chown(node.root, nobody.pw_uid, nobody.pw_gid)  # its store is created by nobody
    env = {"SUDO_USER": "carol", "HOME": str(tmp_path)}
    cli(node, "domain", "add", "n.test", "--route", "mx.test", env=env, preexec=become_nobody)
    assert actor_of(node, "n.test") == "carol (sudo: nobody)"


def test_api_actions_name_the_token(tmp_path: Path) -> None:
    token_file = tmp_path / "deploy-bot.token"
    token_file.write_text("bot-token-from-a-file-0123456789\n")
    node = AdminNode(tmp_path)
    with node.config.open("a") as config:
        config.write(
            "[[admin.tokens]]\n"
            'name = "alice"\n'
            'token = "alice-token-0123456789abcdef"\n'
            "[[admin.tokens]]\n"
            'name = "deploy-bot"\n'
            f"token_file = {json.dumps(str(token_file))}\n"
        )
    node.start()
    try:
        callers = {
            "alice": "alice-token-0123456789abcdef",
            "deploy-bot": "bot-token-from-a-file-0123456789",
            "api": node.token,  # the single [admin] token keeps its name
        }
        for name, token in callers.items():
            with node.client(token) as client:
                response = client.post(
                    "/api/v1/domains", json={"domain": f"{name}.test", "routes": ["mx.test"]}
                )
                assert response.status_code == 201, response.text
        with node.client("alice-token-0123456789abcdef") as client:
            assert client.post("/api/v1/domains/alice.test/hold", json={}).status_code == 200
            wrong = client.get("/api/v1/audit", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            entries = client.get("/api/v1/audit").json()
        items = entries["entries"] if isinstance(entries, dict) else entries
        seen = {(e["actor"], e["action"], e["target"]) for e in items}
        assert {
            ("alice", "domain.add", "alice.test"),
            ("deploy-bot", "domain.add", "deploy-bot.test"),
            ("api", "domain.add", "api.test"),
            ("alice", "domain.hold", "alice.test"),
        } <= seen
        # The server process never names its own OS user for an API call.
        assert not any(e["actor"] in (ME, "cli") for e in items)
    finally:
        node.stop()


# -- the [[admin.tokens]] settings ---------------------------------------------------------------


def config_with(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "mxspool.toml"
    path.write_text('[admin]\nlisten = "127.0.0.1:8025"\n' + body)
    return path


def test_named_tokens_load(tmp_path: Path) -> None:
    path = config_with(
        tmp_path,
        'token = "single"\n[[admin.tokens]]\nname = "ops"\ntoken = "ops-token-0123456789"\n',
    )
    tokens = load_tokens(load_config(str(path)).admin)
    assert [(t.name, t.secret) for t in tokens] == [
        ("api", b"single"),
        ("ops", b"ops-token-0123456789"),
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('name = "x"\n', "exactly one of token or token_file"),
        ('name = "x"\ntoken = "long-enough-token-123"\ntoken_file = "/f"\n', "exactly one"),
        ('name = "bad name"\ntoken = "long-enough-token-123"\n', "admin.tokens.0.name"),
        ('name = "x"\ntoken = "long-enough-token-123"\nrole = "admin"\n', "unknown key"),
    ],
)
def test_bad_token_entries_are_config_errors(tmp_path: Path, body: str, message: str) -> None:
    path = config_with(tmp_path, "[[admin.tokens]]\n" + body)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[[admin.tokens]]\nname = "x"\ntoken = "short"\n', "fewer than 16"),
        ('[[admin.tokens]]\nname = "dashboard"\ntoken = "long-enough-token-123"\n', "reserved"),
        ('token = "single-token-0123456789"\n[[admin.tokens]]\nname = "api"\n'
         'token = "long-enough-token-123"\n', "two admin tokens are named 'api'"),
        ('[[admin.tokens]]\nname = "a"\ntoken = "long-enough-token-123"\n'
         '[[admin.tokens]]\nname = "b"\ntoken = "long-enough-token-123"\n', "same value"),
        ('[[admin.tokens]]\nname = "a"\ntoken_file = "/nonexistent/token"\n', "cannot read"),
    ],
)  # fmt: skip
def test_unusable_tokens_are_refused(tmp_path: Path, body: str, message: str) -> None:
    admin = load_config(str(config_with(tmp_path, body))).admin
    with pytest.raises(AdminConfigError, match=message):
        load_tokens(admin)


def test_serve_refuses_a_bad_token_with_exit_2(tmp_path: Path) -> None:
    path = config_with(tmp_path, '[[admin.tokens]]\nname = "x"\ntoken = "short"\n')
    result = subprocess.run(
        [MXSPOOL, "--config", str(path), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and "fewer than 16" in result.stderr
