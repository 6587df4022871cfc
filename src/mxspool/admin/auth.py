"""Who may use the admin plane: bearer tokens for scripts, a session cookie for the dashboard.

Tokens come from ``[admin] token`` (named "api"), ``[admin] token_file`` (named "token") and
``[[admin.tokens]]`` entries, each with its own ``name`` (one per person or script); the name is
the audit log's actor for actions taken with it. Every presented token is compared
with every configured one by ``hmac.compare_digest``, so timing says nothing about the token.

The dashboard signs in once with a token and then carries a random session id in an HttpOnly,
SameSite=Strict cookie. State-changing requests from the dashboard are same-origin ``fetch``
calls with a JSON body and an ``X-CSRF-Token`` header holding the session's own CSRF token; a
cross-site page can send neither (JSON and custom headers need a CORS preflight, which this
server never grants), so the cookie alone never changes anything. Dashboard actions are
audited as "dashboard".

With no token configured (allowed only on a loopback listener) the API is open, as
docs/interface.md says. Whatever the tokens, only the listener's own names may appear in the Host
header (``mxspool.admin.hosts``), so a web page cannot reach the API through DNS rebinding.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request

from mxspool.admin.errors import ApiError, unauthorized
from mxspool.admin.hosts import HostPolicy
from mxspool.config import AdminConfig, Config, is_loopback, split_host_port

SESSION_COOKIE = "mxspool_session"
CSRF_HEADER = "x-csrf-token"
SESSION_SECONDS = 12 * 3600.0
MAX_SESSIONS = 1000
DASHBOARD_ACTOR = "dashboard"
OPEN_ACTOR = "api"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class AdminConfigError(Exception):
    """The [admin] section cannot be used safely; the message says what to change."""


@dataclass(frozen=True, slots=True)
class Token:
    name: str
    secret: bytes


MIN_NAMED_TOKEN = 16
"""Characters a named token must have at least (``secrets.token_urlsafe(32)`` gives 43)."""


def _read_token_file(path: Path, setting: str) -> str:
    """The first line of a token file; AdminConfigError when unreadable or empty."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise AdminConfigError(
            f"cannot read {setting} {path}: {reason}; "
            "create it with the token on one line, or remove the setting"
        ) from None
    if not text:
        raise AdminConfigError(f"{setting} {path} is empty; put the token on its first line")
    return text.splitlines()[0].strip()


def load_tokens(admin: AdminConfig) -> tuple[Token, ...]:
    """The configured tokens: ``token`` (named "api"), ``token_file`` (named "token") and each
    ``[[admin.tokens]]`` under its own name; AdminConfigError when a file is unreadable or empty,
    a name is used twice or reserved, or two tokens are the same secret (the audit log could not
    tell them apart)."""
    tokens: list[Token] = []
    if admin.token:
        tokens.append(Token("api", admin.token.encode()))
    if admin.token_file:
        secret = _read_token_file(Path(admin.token_file), "[admin] token_file")
        tokens.append(Token("token", secret.encode()))
    for entry in admin.tokens:
        where = f"[[admin.tokens]] {entry.name!r}"
        secret = entry.token or _read_token_file(Path(entry.token_file), f"{where} token_file")
        if len(secret) < MIN_NAMED_TOKEN:
            raise AdminConfigError(
                f"{where}: the token has {len(secret)} characters, fewer than {MIN_NAMED_TOKEN}; "
                "make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        tokens.append(Token(entry.name, secret.encode()))
    names = [token.name for token in tokens]
    for token in tokens:
        if token.name == DASHBOARD_ACTOR:
            raise AdminConfigError(
                f'the token name "{DASHBOARD_ACTOR}" is reserved for dashboard sessions in the '
                "audit log; choose another name"
            )
        if names.count(token.name) > 1:
            raise AdminConfigError(
                f'two admin tokens are named {token.name!r} ([admin] token is named "api", '
                '[admin] token_file "token"); give each [[admin.tokens]] its own name'
            )
    secrets_seen = [token.secret for token in tokens]
    if len(set(secrets_seen)) < len(secrets_seen):
        raise AdminConfigError(
            "two admin tokens have the same value, so the audit log could not tell who acted; "
            "give each its own token"
        )
    return tuple(tokens)


def admin_address(admin: AdminConfig, tokens: tuple[Token, ...]) -> tuple[str, int]:
    """Host and port to listen on; refuses a non-loopback listener without a token."""
    try:
        host, port = split_host_port(admin.listen)
    except ValueError as exc:
        raise AdminConfigError(f"[admin] listen: {exc}") from None
    if not is_loopback(host) and not tokens:
        raise AdminConfigError(
            f"the admin API would listen on {admin.listen} without a token, so anyone who can "
            "reach it could release or discard mail; set [admin] token (or token_file, or "
            "[[admin.tokens]] entries), or "
            'listen on a loopback address such as "127.0.0.1:8025"'
        )
    return host, port


def host_policy(config: Config) -> HostPolicy:
    """The Host names the admin plane answers to; AdminConfigError for a bad allowed_hosts."""
    try:
        return HostPolicy.of(config)
    except ValueError as exc:
        raise AdminConfigError(str(exc)) from None


@dataclass(slots=True)
class Session:
    id: str
    csrf: str
    token_name: str
    expires: float


class Sessions:
    """Dashboard sessions, in memory: a node restart signs everybody out, which is fine."""

    def __init__(self, lifetime: float = SESSION_SECONDS, limit: int = MAX_SESSIONS) -> None:
        self._lifetime = lifetime
        self._limit = limit
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def create(self, token_name: str) -> Session:
        while len(self._sessions) >= self._limit:
            self._sessions.popitem(last=False)
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            token_name=token_name,
            expires=time.time() + self._lifetime,
        )
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires < time.time():
            del self._sessions[session_id]
            return None
        return session

    def drop(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: ``actor`` goes to the audit log."""

    actor: str
    session: Session | None = None


class Auth:
    def __init__(self, tokens: tuple[Token, ...], loopback: bool) -> None:
        self.tokens = tokens
        self.loopback = loopback
        self.sessions = Sessions()

    @property
    def open(self) -> bool:
        """No token configured: the API needs none (only ever on a loopback listener)."""
        return not self.tokens

    def match(self, presented: str) -> str | None:
        """The name of the token ``presented`` is, compared in constant time with each one."""
        candidate = presented.encode()
        name: str | None = None
        for token in self.tokens:
            if hmac.compare_digest(token.secret, candidate):
                name = token.name
        return name

    def session_of(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(SESSION_COOKIE))

    def api_principal(self, request: Request) -> Principal:
        """Authenticate an /api/v1 request (bearer token, or dashboard session + CSRF)."""
        header = request.headers.get("authorization")
        if header is not None and not self.open:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise unauthorized("use 'Authorization: Bearer <token>'")
            name = self.match(value.strip())
            if name is None:
                raise unauthorized("the bearer token is not valid")
            return Principal(name)
        session = self.session_of(request)
        if session is not None:
            if request.method not in SAFE_METHODS:
                presented = request.headers.get(CSRF_HEADER, "")
                if not hmac.compare_digest(session.csrf.encode(), presented.encode()):
                    raise ApiError(
                        403,
                        "csrf",
                        "missing or wrong X-CSRF-Token; reload the dashboard page and try again",
                    )
            return Principal(DASHBOARD_ACTOR, session)
        if self.open:
            return Principal(OPEN_ACTOR)
        raise unauthorized()
