"""What guards the Serve app's HTTP port: named API keys, per-key quotas, the Host allow-list, JSON-only bodies, the
body-size cap, CORS and request ids.

- **API keys**: the operator lists keys in an environment variable (`ServeConfig.api_keys_env`, default
  `SUBQ_API_KEYS`, comma-separated) and/or a file (`ServeConfig.api_keys_file`). The file is either one key a line
  (`#` comments; such keys are named `key-<first 8 hex of their SHA-256>`) or, when it ends in `.yaml`/`.yml`/`.json`
  or starts with `keys:`/`{`, a mapping:

      keys:
        - name: alice                 # shown in logs, evaluation owners, /v1/usage
          key: sk-alice-...           # or key_env: ALICE_KEY (read from the environment where the app is built)
          admin: false                # admin keys see and cancel every key's evaluations
          quotas: {requests_per_minute: 60, max_running_evaluations: 2, usd_per_day: 5.0, max_stored_evaluations: 50}

  A key given in both places counts once (the file's name, admin flag and quotas win). The driver reads the keys
  and hands the Ingress only their SHA-256 digests, ids and names (keys never enter the Serve config, the dashboard,
  logs or evaluation records); a request's `Authorization: Bearer <key>` is hashed and compared to every digest with
  `secrets.compare_digest`. Every route but `/healthz` needs a key once any key is configured. The guard lives in
  the replica's environment (`SUBQ_SERVE_GUARD`); when it is missing or unreadable every request is refused (500):
  auth fails closed.
- **Quotas** (ServeConfig.quotas, overridden per key in the key file): requests per minute (sliding window, every
  route but /healthz), running and stored evaluations, and $ per UTC day across /v1/solve (both stages, the paid
  solver included), chat and evaluations; plus a server-wide $ per day (ServeConfig.max_usd_per_day). Over a limit:
  429 + `Retry-After` in OpenAI's error shape (`rate_limit_exceeded` / `insufficient_quota`).
- **Exposure** (`check_exposure`): a non-loopback bind address needs keys or an explicit `insecure`; the address
  checked is the one Serve's proxy really binds (`bound_hosts`) as well as the config's `host`, in every start path.
- **Browser-safe**: a POST/PUT/PATCH body to `/v1/...` must be `application/json`; the one exception is a request
  carrying `Authorization` (`curl -d` with a key sends a form content type), which no cross-site simple request can
  do. A keyless server bound to loopback answers only `Host: localhost/127.0.0.1/[::1]` (DNS rebinding), or the
  operator's `allowed_hosts`. CORS stays closed unless `cors_origins` is configured (Starlette's CORSMiddleware).
- **Body cap on bytes actually read**: the body is read message by message and refused (413) as soon as it passes
  `max_request_bytes` (a chunked body has no Content-Length to trust).
- **Request ids**: every response carries `x-request-id`; 5xx bodies carry it too (`error.request_id`) and the
  details (upstream URL, exception text) go only to the server log under that id.

Errors use OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import collections
import contextvars
import datetime as _dt
import hashlib
import ipaddress
import json
import math
import os
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from subq import storage
from subq.errors import ConfigError, DataError

PUBLIC_PATHS = ("/healthz",)
GUARD_ENV = "SUBQ_SERVE_GUARD"
QUOTA_FIELDS = ("requests_per_minute", "max_running_evaluations", "usd_per_day", "max_stored_evaluations")
PAID_PATHS = ("/v1/solve", "/v1/chat/completions", "/v1/evaluations", "/v1/decompose")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


# ---------------------------------------------------------------- keys


@dataclass
class KeyEntry:
    """One configured key, as the Ingress sees it: its digest, never the key."""

    digest: str
    id: str
    name: str
    admin: bool = False
    quotas: dict = field(default_factory=dict)

    def public(self) -> dict:
        return {"digest": self.digest, "id": self.id, "name": self.name, "admin": self.admin, "quotas": self.quotas}


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _entry(key: str, name: Optional[str] = None, admin: bool = False, quotas: Optional[dict] = None,
           where: str = "api_keys_file") -> KeyEntry:
    d = digest(key)
    kid = f"key-{d[:8]}"
    if quotas:
        bad = sorted(set(quotas) - set(QUOTA_FIELDS))
        if bad:
            raise ConfigError(f"unknown quota {bad[0]!r}; known: {list(QUOTA_FIELDS)}", field=f"{where}.quotas")
        quotas = dict(quotas)
        for k, v in quotas.items():
            if isinstance(v, str):  # YAML 1.1 reads `1e-06` (no dot) as a string
                try:
                    v = quotas[k] = float(v)
                except ValueError:
                    pass
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0
                                  or not math.isfinite(v)):
                raise ConfigError(f"quota {k} must be a finite number >= 0 (or null: no limit)", field=f"{where}.quotas.{k}")
    if name is not None and (not isinstance(name, str) or not name.strip() or len(name) > 64):
        raise ConfigError("a key's name must be a non-empty string of at most 64 characters", field=f"{where}.name")
    return KeyEntry(d, kid, (name or kid).strip(), bool(admin), dict(quotas or {}))


def _structured(text: str, path: str) -> list[KeyEntry]:
    import yaml

    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"the API keys file is not valid YAML/JSON ({type(e).__name__})", field="api_keys_file") from None
    items = raw.get("keys") if isinstance(raw, dict) else None
    if not isinstance(items, list):
        raise ConfigError("the API keys file needs a `keys:` list of {name, key | key_env, admin, quotas}",
                          field="api_keys_file.keys")
    out = []
    for i, it in enumerate(items):
        where = f"api_keys_file.keys.{i}"
        if not isinstance(it, dict):
            raise ConfigError("each key is a mapping {name, key | key_env, admin, quotas}", field=where)
        unknown = sorted(set(it) - {"name", "key", "key_env", "admin", "quotas"})
        if unknown:
            raise ConfigError(f"unknown field {unknown[0]!r}", field=f"{where}.{unknown[0]}")
        key = it.get("key")
        if key is None and it.get("key_env"):
            key = os.environ.get(str(it["key_env"]))
            if not key:
                raise ConfigError(f"environment variable {it['key_env']} (key_env) is not set", field=f"{where}.key_env")
        if not isinstance(key, str) or not key.strip():
            raise ConfigError("each key needs `key` (or `key_env`): a non-empty string", field=f"{where}.key")
        if not isinstance(it.get("quotas") or {}, dict):
            raise ConfigError("quotas must be a mapping", field=f"{where}.quotas")
        out.append(_entry(key.strip(), it.get("name"), it.get("admin", False), it.get("quotas"), where))
    return out


def load_key_entries(env_name: Optional[str], path: Optional[str]) -> list[KeyEntry]:
    """Keys from the environment variable named `env_name` (comma-separated) and the file at `path` (plain lines or
    the structured form above), one entry per distinct key; the file's entry wins over the variable's."""
    entries: dict[str, KeyEntry] = {}
    if env_name and os.environ.get(env_name):
        for k in os.environ[env_name].split(","):
            if k.strip():
                e = _entry(k.strip(), where=env_name)
                entries[e.digest] = e
    if path:
        try:
            text = open(os.path.expanduser(path), encoding="utf-8").read()
        except OSError as e:
            raise ConfigError(f"cannot read the API keys file: {e.strerror}", field="api_keys_file") from None
        first = next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), "")
        if path.endswith((".yaml", ".yml", ".json")) or first.startswith(("keys:", "{")):
            for e in _structured(text, path):
                entries[e.digest] = e
        else:
            for ln in text.splitlines():
                if ln.strip() and not ln.lstrip().startswith("#"):
                    e = _entry(ln.strip())
                    entries[e.digest] = e
    names = [e.name for e in entries.values()]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"two keys are named {dup!r}: names must be unique (they own evaluations)", field="api_keys_file")
    return list(entries.values())


def load_api_keys(env_name: Optional[str], path: Optional[str]) -> list[str]:
    """Digests of the configured keys (kept for callers that only count keys)."""
    return [e.digest for e in load_key_entries(env_name, path)]


# ---------------------------------------------------------------- exposure


def is_loopback(host: Optional[str]) -> bool:
    if host is None:
        return True  # Serve starts no proxy
    host = host.strip("[]")
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def proxy_host() -> Optional[str]:
    """The address Serve's HTTP proxy binds on the running cluster (its controller's http options), or None when no
    Serve controller runs here. This, not the app's `host` field, is what `serve deploy`/KubeRay expose."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        return None if client is None else str(client.http_config.host)
    except Exception:  # noqa: BLE001 - no controller reachable: only the config's host is known
        return None


def bound_hosts(config_host: str) -> list[str]:
    """Every address the app may be reachable on: the config's host, the running proxy's bind address and, when no
    proxy runs yet, the default Serve would bind (RAY_SERVE_DEFAULT_HTTP_HOST)."""
    hosts = [config_host]
    real = proxy_host()
    if real is not None:
        hosts.append(real)
    elif os.environ.get("RAY_SERVE_DEFAULT_HTTP_HOST"):
        hosts.append(os.environ["RAY_SERVE_DEFAULT_HTTP_HOST"])
    return list(dict.fromkeys(hosts))


def check_exposure(host, n_keys: int, insecure: bool) -> None:
    """A non-loopback bind needs API keys, or an explicit --insecure. `host`: one address or several."""
    for h in ([host] if isinstance(host, str) or host is None else host):
        if n_keys == 0 and not insecure and not is_loopback(h):
            raise ConfigError(f"refusing to serve on {h} without API keys: anyone who can reach it could start paid "
                              f"solver calls", field="host",
                              hint="set SUBQ_API_KEYS (comma-separated) or api_keys_file, bind 127.0.0.1 (Serve's "
                                   "http_options.host too), or pass --insecure if a proxy in front already "
                                   "authenticates")


# ---------------------------------------------------------------- the replica's guard


def set_guard(entries: list[dict], max_request_bytes: int, *, default_quotas: Optional[dict] = None,
              max_usd_per_day: Optional[float] = None, allowed_hosts: Optional[list[str]] = None,
              cors_origins: Optional[list[str]] = None, max_list_items: int = 500) -> None:
    """Called by Ingress.__init__ in its replica process (one Ingress per process). Process environment, not a module
    global: Serve pickles the ingress class and its FastAPI app by value. Only digests, ids, names and quotas."""
    os.environ[GUARD_ENV] = json.dumps({
        "keys": entries, "max_request_bytes": int(max_request_bytes), "quotas": default_quotas or {},
        "max_usd_per_day": max_usd_per_day, "allowed_hosts": allowed_hosts, "cors_origins": cors_origins or [],
        "max_list_items": int(max_list_items)})


_cache: dict = {}


def guard() -> Optional[dict]:
    """This replica's guard, or None when it is missing or unreadable (then every request is refused)."""
    raw = os.environ.get(GUARD_ENV)
    if not raw:
        return None
    if _cache.get("raw") != raw:
        try:
            g = json.loads(raw)
            g["by_digest"] = {k["digest"]: k for k in g["keys"]}
        except (ValueError, KeyError, TypeError):
            return None
        _cache.update(raw=raw, guard=g)
    return _cache["guard"]


ANONYMOUS = {"id": "anonymous", "name": "anonymous", "admin": True, "quotas": {}}
_caller: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("subq_caller", default=None)
_request_id: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("subq_request_id", default=None)


def current_caller() -> dict:
    """The key of the request being served: {"id", "name", "admin", "quotas"} (ANONYMOUS on a keyless server)."""
    c = _caller.get()
    if c is None:
        return dict(ANONYMOUS, quotas=dict((guard() or {}).get("quotas") or {}))
    return c


def current_request_id() -> str:
    return _request_id.get() or f"req-{uuid.uuid4().hex[:16]}"


def identify(authorization: Optional[str], g: dict) -> Optional[dict]:
    """The key entry `Authorization: Bearer <key>` matches (constant-time; every digest is compared), or None."""
    if not authorization or not authorization.lower().startswith("bearer "):
        return None
    d = digest(authorization[7:].strip())
    hit = None
    for ref in g["by_digest"]:
        if secrets.compare_digest(d, ref):
            hit = ref
    return g["by_digest"][hit] if hit else None


def key_ok(authorization: Optional[str], digests: list[str]) -> bool:
    """True when `Authorization: Bearer <key>` matches one digest."""
    return identify(authorization, {"by_digest": {d: {} for d in digests}}) is not None


def effective_quotas(entry: dict, g: Optional[dict]) -> dict:
    q = dict((g or {}).get("quotas") or {})
    q.update(entry.get("quotas") or {})  # a key's explicit null: no limit for that key
    return q


# ---------------------------------------------------------------- quota state (per replica process)


def _seconds_to_utc_midnight(now: float) -> int:
    d = _dt.datetime.fromtimestamp(now, _dt.timezone.utc)
    nxt = _dt.datetime.combine(d.date() + _dt.timedelta(days=1), _dt.time(), _dt.timezone.utc)
    return max(1, int(math.ceil(nxt.timestamp() - now)))


class Ledger:
    """Per-key request windows and $ spent per UTC day (one per replica process; the Ingress is one replica).

    With `persist(root)` (the Ingress: its results root) the day's spend is kept in `<root>/spend-<UTC day>.json`,
    rewritten atomically after each paid call and read back when a replica starts, so a restarted or crashed Ingress
    does not hand every key a fresh day's budget. Request windows are not kept (they span a minute)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.hits: dict[str, collections.deque] = {}
        self.spend: dict[str, tuple[str, float]] = {}
        self.root: Optional[str] = None

    def _file(self, day: str) -> str:
        return storage.join(self.root, f"spend-{day}.json")

    def persist(self, root: str, now: Optional[float] = None) -> None:
        """Keep the day's spend under `root` and start from what is there (a previous replica's spend today)."""
        self.root = str(root)
        today = self.day(now)
        try:
            kept = json.loads(storage.read_bytes(self._file(today)))
        except (DataError, ValueError, OSError):
            return  # nothing spent today yet
        with self._lock:
            for k, usd in (kept.get("spend") or {}).items():
                day, total = self.spend.get(k, (today, 0.0))
                self.spend[k] = (today, max(float(usd), total if day == today else 0.0))

    @staticmethod
    def day(now: Optional[float] = None) -> str:
        return time.strftime("%Y-%m-%d", time.gmtime(now or time.time()))

    def hit(self, key_id: str, per_minute: Optional[float], now: Optional[float] = None) -> Optional[int]:
        """Record a request; over `per_minute` in the last 60 s: the seconds to wait (and nothing recorded)."""
        if per_minute is None:
            return None
        now = now or time.monotonic()
        with self._lock:
            q = self.hits.setdefault(key_id, collections.deque())
            while q and now - q[0] >= 60:
                q.popleft()
            if len(q) >= per_minute:
                return max(1, int(math.ceil(60 - (now - q[0])))) if q else 60
            q.append(now)
        return None

    def spent(self, key_id: str, now: Optional[float] = None) -> float:
        day, usd = self.spend.get(key_id, ("", 0.0))
        return usd if day == self.day(now) else 0.0

    def add(self, key_id: str, usd: float, now: Optional[float] = None) -> None:
        if not usd or usd <= 0:
            return
        today = self.day(now)
        with self._lock:
            for k in (key_id, "*"):  # "*": the whole server
                day, total = self.spend.get(k, (today, 0.0))
                self.spend[k] = (today, (total if day == today else 0.0) + float(usd))
            if self.root is not None:
                kept = {k: usd for k, (day, usd) in self.spend.items() if day == today}
                storage.write_bytes_atomic(self._file(today), json.dumps({"day": today, "spend": kept}).encode())

    def over_budget(self, caller: dict, g: Optional[dict], now: Optional[float] = None) -> Optional[dict]:
        """None, or the 429 to answer: the key's $ per day or the server's is spent."""
        now = now or time.time()
        q = effective_quotas(caller, g)
        cap = q.get("usd_per_day")
        if cap is not None and self.spent(caller["id"], now) >= cap:
            return {"message": f"key {caller['name']!r} has spent its ${cap:g} for today (quota usd_per_day); it "
                               f"resets at 00:00 UTC", "code": "insufficient_quota", "retry_after": _seconds_to_utc_midnight(now)}
        server = (g or {}).get("max_usd_per_day")
        if server is not None and self.spent("*", now) >= server:
            return {"message": f"the server has spent its ${server:g} for today (max_usd_per_day); it resets at "
                               f"00:00 UTC", "code": "insufficient_quota", "retry_after": _seconds_to_utc_midnight(now)}
        return None


LEDGER = Ledger()


def ledger() -> Ledger:
    """This process's Ledger. Call it, never import LEDGER elsewhere: Serve pickles the Ingress's methods by value,
    and an object they name directly would be a copy that the middleware never sees."""
    return LEDGER


def _serve_request_id() -> Optional[str]:
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:  # noqa: BLE001 - outside a Serve replica
        return None


# ---------------------------------------------------------------- HTTP


def error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None, **extra: Any) -> dict:
    """OpenAI's error object (`openai.APIStatusError` parses it: .message, .type, .param, .code)."""
    err = {"message": message, "type": type_, "param": param, "code": code}
    err.update({k: v for k, v in extra.items() if v is not None})
    return {"error": err}


async def _send_json(send, status: int, body: dict, headers: Optional[dict] = None) -> None:
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})


def _host_allowed(host_header: str, allowed: list[str]) -> bool:
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    for pat in allowed:
        pat = pat.lower().strip("[]")
        if pat == "*" or host == pat or (pat.startswith("*.") and host.endswith(pat[1:])):
            return True
    return False


class GuardMiddleware:
    """Pure ASGI middleware: request id, Host allow-list, CORS (when configured), API key, rate limit, $ admission,
    the body read under the cap, JSON-only bodies."""

    def __init__(self, app):
        self.app = app
        self._cors = None
        self._cors_origins = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        served = _serve_request_id()  # Serve's own id: its access log and its x-request-id header carry it
        rid = served or f"req-{uuid.uuid4().hex[:16]}"
        _request_id.set(rid)
        t0 = time.perf_counter()

        async def send_with_id(msg):
            if msg["type"] == "http.response.start":
                extra = [(b"server-timing", f"app;dur={(time.perf_counter() - t0) * 1000:.1f}".encode())]
                if not served:
                    extra.append((b"x-request-id", rid.encode()))
                msg = dict(msg, headers=list(msg.get("headers", [])) + extra)
            await send(msg)

        g = guard()
        if g is None:  # fail closed: the replica does not know its keys
            return await _send_json(send_with_id, 500, error_body(
                "the server's API-key guard is not configured; refusing every request", "server_error", None,
                "auth_not_configured", request_id=rid))
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        rel = path[len(root):] if root and path.startswith(root) else path
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if g.get("allowed_hosts") is not None and rel not in PUBLIC_PATHS \
                and not _host_allowed(headers.get("host", ""), g["allowed_hosts"]):
            return await _send_json(send_with_id, 400, error_body(
                "Host header not allowed on this server (allowed_hosts)", "invalid_request_error", "host",
                "invalid_host"))
        if g.get("cors_origins"):
            if self._cors is None or self._cors_origins != g["cors_origins"]:
                from starlette.middleware.cors import CORSMiddleware

                self._cors_origins = list(g["cors_origins"])
                self._cors = CORSMiddleware(self._guarded, allow_origins=self._cors_origins,
                                            allow_methods=["GET", "POST", "DELETE"],
                                            allow_headers=["authorization", "content-type"],
                                            expose_headers=["retry-after", "x-request-id"])
            return await self._cors(scope, receive, send_with_id)
        return await self._guarded(scope, receive, send_with_id)

    async def _guarded(self, scope, receive, send):
        g = guard()
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        rel = path[len(root):] if root and path.startswith(root) else path
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        caller: Optional[dict] = None
        if g["keys"] and rel not in PUBLIC_PATHS:
            entry = identify(headers.get("authorization"), g)
            if entry is None:
                msg = ("missing API key: send `Authorization: Bearer <key>`" if "authorization" not in headers
                       else "incorrect API key provided")
                return await _send_json(send, 401, error_body(msg, "invalid_request_error", None, "invalid_api_key"),
                                        {"WWW-Authenticate": "Bearer"})
            caller = {"id": entry["id"], "name": entry["name"], "admin": bool(entry.get("admin")),
                      "quotas": effective_quotas(entry, g)}
        elif rel not in PUBLIC_PATHS:
            caller = dict(ANONYMOUS, quotas=dict(g.get("quotas") or {}))
        _caller.set(caller)
        if caller is not None:
            wait = ledger().hit(caller["id"], caller["quotas"].get("requests_per_minute"))
            if wait is not None:
                return await _send_json(send, 429, error_body(
                    f"rate limit reached for key {caller['name']!r}: {caller['quotas']['requests_per_minute']:g} "
                    f"requests per minute (quota requests_per_minute)", "requests", None, "rate_limit_exceeded"),
                    {"Retry-After": wait})
            if scope.get("method") == "POST" and rel in PAID_PATHS:
                over = ledger().over_budget(caller, g)
                if over:
                    return await _send_json(send, 429, error_body(over["message"], "insufficient_quota", None,
                                                                  over["code"]), {"Retry-After": over["retry_after"]})
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = int(g.get("max_request_bytes") or 1_000_000)
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
        ctype = headers.get("content-type", "")
        if rel.startswith("/v1/") and data and "json" not in ctype:
            if "authorization" not in headers:  # a cross-site simple request (text/plain, form) cannot set it
                return await _send_json(send, 415, error_body(
                    f"request bodies must be JSON (Content-Type: application/json), got {ctype[:60] or 'none'!r}",
                    "invalid_request_error", "content-type", "unsupported_media_type"))
            scope = dict(scope)  # `curl -d` with a key: the body is read as JSON
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
