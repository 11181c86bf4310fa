"""Ray 2.60 token authentication for subq's cluster commands (`subq submit`, `subq jobs`).

    ray get-auth-token --generate            # once, on the machine that starts the head: ~/.ray/auth_token
    RAY_AUTH_MODE=token ray start --head --dashboard-host 127.0.0.1
    subq jobs list --address http://127.0.0.1:8265

A Ray 2.60 cluster started with token authentication refuses every dashboard/Jobs API request without
`Authorization: Bearer <token>` (401 "Missing authentication token", 403 for a wrong one). subq keeps
authentication on and finds the token the ways Ray documents, first match wins:

1. `RAY_AUTH_TOKEN`        the token itself, in the environment;
2. `RAY_AUTH_TOKEN_PATH`   a file holding it;
3. `~/.ray/auth_token`     the default file (`ray get-auth-token --generate` writes it).

The token is sent as an explicit header, so it works whatever this process's own `RAY_AUTH_MODE` is. The
token is never printed: messages name only WHERE it was looked for / found.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from subq.errors import SubqError

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
HELP = ("give subq the cluster's token: export RAY_AUTH_TOKEN=<token>, or RAY_AUTH_TOKEN_PATH=<file>, or copy the "
        "head's ~/.ray/auth_token to this machine's ~/.ray/auth_token (on the head: `ray get-auth-token`)")


@dataclass(frozen=True)
class Token:
    """A cluster token and where it came from (`source` is safe to print; `value` never is)."""

    value: str = ""  # the secret itself
    source: str = ""  # "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH=<path>" or "<path>"

    def __repr__(self) -> str:  # never show the value
        return f"Token(source={self.source!r})"


def default_token_path() -> Path:
    """Ray's default token file, `~/.ray/auth_token` (as `ray get-auth-token --generate` writes it)."""
    return Path.home() / ".ray" / "auth_token"


def find_token(environ: Optional[dict] = None) -> Optional[Token]:
    """The cluster token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (first match), else None.
    A RAY_AUTH_TOKEN_PATH that does not exist is a user mistake and raises SubqError naming it."""
    env = os.environ if environ is None else environ
    if env.get(TOKEN_ENV, "").strip():
        return Token(env[TOKEN_ENV].strip(), TOKEN_ENV)
    path = env.get(TOKEN_PATH_ENV)
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise SubqError(f"{TOKEN_PATH_ENV} points to {p}, which is not a file", field=TOKEN_PATH_ENV, hint=HELP)
        return Token(p.read_text().strip(), f"{TOKEN_PATH_ENV}={p}")
    p = default_token_path()
    if p.is_file() and p.read_text().strip():
        return Token(p.read_text().strip(), str(p))
    return None


def auth_headers(token: Optional[Token]) -> dict:
    """HTTP headers for the Ray dashboard / Jobs API (empty without a token)."""
    return {"Authorization": f"Bearer {token.value}"} if token and token.value else {}


def explain(status: int, address: str, token: Optional[Token]) -> SubqError:
    """The one-line error subq prints when the cluster refuses us (401: no token sent, 403: wrong token)."""
    if status == 401 or token is None:
        return SubqError(f"the Ray cluster at {address} requires an authentication token and none was found "
                         f"(looked in ${TOKEN_ENV}, ${TOKEN_PATH_ENV}, {default_token_path()})",
                         field="RAY_AUTH_TOKEN", hint=HELP)
    return SubqError(f"the Ray cluster at {address} rejected the token from {token.source} (wrong cluster or "
                     f"rotated token)", field="RAY_AUTH_TOKEN", hint=HELP)
