"""What guards the Serve app's HTTP port: API keys, the body-size cap, JSON bodies whatever the content type.

- **API keys**: the operator lists keys in an environment variable (`ServeConfig.api_keys_env`, default
  `SUBQ_API_KEYS`, comma-separated) and/or a file (`ServeConfig.api_keys_file`, one key a line, `#` comments).
  The driver reads them and hands the Ingress only their SHA-256 digests (keys never enter the Serve config, the
  dashboard or logs); a request's `Authorization: Bearer <key>` is hashed and compared to every digest with
  `secrets.compare_digest`. Every route but `/healthz` needs a key once any key is configured.
- `subq serve` refuses to bind a non-loopback host without keys unless told `--insecure` (`check_exposure`).
- **Body cap on bytes actually read**: the ASGI middleware reads the body itself, message by message, and answers
  413 as soon as it passes `max_request_bytes` (a chunked body has no Content-Length to trust).
- **JSON whatever the content type**: `curl -d '{...}'` sends `application/x-www-form-urlencoded`; a POST body to
  `/v1/...` is parsed as JSON regardless (the header is rewritten before FastAPI sees it).

Errors use OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import secrets
from typing import Any, Optional

from subq.errors import ConfigError

PUBLIC_PATHS = ("/healthz",)
_DIGESTS_ENV, _MAX_BYTES_ENV = "SUBQ_SERVE_KEY_DIGESTS", "SUBQ_MAX_REQUEST_BYTES"


def set_guard(digests: list[str], max_request_bytes: int) -> None:
    """Called by Ingress.__init__ in its replica process (one Ingress per process). Process environment, not a module
    global: Serve pickles the ingress class and its FastAPI app by value, so a module dict would be a copy."""
    os.environ[_DIGESTS_ENV] = ",".join(digests)
    os.environ[_MAX_BYTES_ENV] = str(int(max_request_bytes))


def guard() -> tuple[list[str], int]:
    """(key digests, body byte limit) of this replica."""
    digests = [d for d in os.environ.get(_DIGESTS_ENV, "").split(",") if d]
    return digests, int(os.environ.get(_MAX_BYTES_ENV, "1000000"))


def error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None, **extra: Any) -> dict:
    """OpenAI's error object (`openai.APIStatusError` parses it: .message, .type, .param, .code)."""
    err = {"message": message, "type": type_, "param": param, "code": code}
    err.update({k: v for k, v in extra.items() if v is not None})
    return {"error": err}


def load_api_keys(env_name: Optional[str], path: Optional[str]) -> list[str]:
    """Keys from the environment variable named `env_name` (comma-separated) and the file at `path`."""
    keys: list[str] = []
    if env_name and os.environ.get(env_name):
        keys += [k.strip() for k in os.environ[env_name].split(",") if k.strip()]
    if path:
        try:
            text = open(os.path.expanduser(path), encoding="utf-8").read()
        except OSError as e:
            raise ConfigError(f"cannot read the API keys file: {e.strerror}", field="api_keys_file") from None
        keys += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return keys


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_ok(authorization: Optional[str], digests: list[str]) -> bool:
    """True when `Authorization: Bearer <key>` matches one digest (constant-time; every digest is compared)."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return False
    d = digest(authorization[7:].strip())
    ok = False
    for ref in digests:
        ok |= secrets.compare_digest(d, ref)
    return ok


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, n_keys: int, insecure: bool) -> None:
    """A non-loopback bind needs API keys, or an explicit --insecure."""
    if n_keys == 0 and not insecure and not is_loopback(host):
        raise ConfigError(f"refusing to serve on {host} without API keys: anyone who can reach it could start paid "
                          f"solver calls", field="host",
                          hint="set SUBQ_API_KEYS (comma-separated) or api_keys_file, bind 127.0.0.1, "
                               "or pass --insecure if a proxy in front already authenticates")


async def _send_json(send, status: int, body: dict, headers: Optional[dict] = None) -> None:
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})


class GuardMiddleware:
    """Pure ASGI middleware: API key, then the body read under the cap, then JSON content type."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        rel = path[len(root):] if root and path.startswith(root) else path
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        digests, limit = guard()
        if digests and rel not in PUBLIC_PATHS and not key_ok(headers.get("authorization"), digests):
            msg = ("missing API key: send `Authorization: Bearer <key>`" if "authorization" not in headers
                   else "incorrect API key provided")
            return await _send_json(send, 401, error_body(msg, "invalid_request_error", None, "invalid_api_key"),
                                    {"WWW-Authenticate": "Bearer"})
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > limit:
                return await _send_json(send, 413, error_body(
                    f"request body is over {limit} bytes (max_request_bytes)", "invalid_request_error", "body",
                    "request_too_large"))
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        data = b"".join(chunks)
        if rel.startswith("/v1/") and data and "json" not in headers.get("content-type", ""):
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
