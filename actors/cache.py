"""Where a teacher call goes and what it is: the endpoint (normalised, never with credentials in it) and the durable request cache keyed by it (content-addressed files, written atomically after a good reply)."""

from __future__ import annotations

import hashlib
import json
from typing import Optional

from actors.errors import _KEYLIKE, TeacherUnavailableError
from subq import storage
from subq.errors import DataError


def normalize_endpoint(base_url: Optional[str]) -> str:
    """An endpoint's identity: scheme://host[:port]/path, lower-case host, no credentials, query, fragment,
    default port or trailing slash (None: the OpenAI API). `http://u:p@Host:80/v1/` -> `http://host/v1`."""
    from urllib.parse import urlsplit

    u = urlsplit((base_url or "https://api.openai.com/v1").strip())
    scheme = (u.scheme or "https").lower()
    host = (u.hostname or "").lower()
    port = u.port
    if port and not ((scheme == "http" and port == 80) or (scheme == "https" and port == 443)):
        host = f"{host}:{port}"
    return f"{scheme}://{host}{u.path.rstrip('/')}"


def has_userinfo(base_url: Optional[str]) -> bool:
    """True when a base URL carries credentials (`https://user:password@host/...`)."""
    from urllib.parse import urlsplit

    try:
        u = urlsplit((base_url or "").strip())
    except ValueError:
        return False
    return bool(u.username or u.password or "@" in (u.netloc or ""))


def refuse_userinfo(base_url: Optional[str], field: str = "base_url") -> None:
    """A clear error (naming the field, never the URL) for credentials in a base URL: they would reach actor
    names, config files and logs. The key belongs in the environment variable named by --api-key-env."""
    if has_userinfo(base_url):
        from subq.errors import ConfigError

        raise ConfigError("the base URL holds credentials (user:password@host); they would be written to actor "
                          "names, config files and logs", field=field,
                          hint="remove them from the URL and put the key in the variable named by --api-key-env")


def check_endpoint(base_url: Optional[str], timeout_s: float = 10.0) -> None:
    """Fail at once (TeacherUnavailableError, naming the endpoint) when nothing answers at `base_url`; any HTTP
    reply, even an error status, counts as reachable. Sends no key."""
    import httpx

    url = normalize_endpoint(base_url) + "/models"
    try:
        httpx.get(url, timeout=timeout_s)
    except (httpx.ConnectError, httpx.ConnectTimeout) as e:
        raise TeacherUnavailableError(f"cannot connect ({type(e).__name__}: {_KEYLIKE.sub('sk-***', str(e))[:200]})",
                                      upstream=base_url or normalize_endpoint(None),
                                      hint="is the server running? check --base-url") from None
    except httpx.HTTPError:
        pass


def cache_key(model: str, messages: list[dict], temperature: float, max_tokens: int, sample_index: int,
              template_id: Optional[str], endpoint: Optional[str] = None) -> str:
    """Content address of one call: sha256 over everything that determines what is paid for. The messages are
    the rendered template, so a changed template text is a new key. `endpoint` (normalized with
    `normalize_endpoint`, credentials stripped) makes replies of one endpoint invisible to another; None keeps
    the endpoint-less key of older versions."""
    d = {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens,
         "sample_index": sample_index, "template_id": template_id}
    if endpoint is not None:
        d["endpoint"] = normalize_endpoint(endpoint)
    blob = json.dumps(d, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class RequestCache:
    """Durable content-addressed cache of good replies: one small JSON file per call (atomic writes; local
    paths or any pyarrow filesystem URI).

    Changed for issue 11 (API otherwise stable: get/put/path/keys as before): `cache_key(...)` takes an optional
    `endpoint=` (TeacherClient always passes its base URL, so its keys differ from endpoint-less ones);
    TeacherClient stores `endpoint` and `model` in each entry and uses a hit only when both match
    (`RequestCache.matches`). Writes go through `storage.write_bytes_atomic` (a unique `_tmp-` temp, fsync)."""

    @staticmethod
    def matches(entry: dict, endpoint: Optional[str], model: str) -> bool:
        """Provenance check of a hit: the entry was written by a call to this endpoint and model."""
        return entry.get("endpoint") == normalize_endpoint(endpoint) and entry.get("model") == model

    def __init__(self, location: str):
        self.location = str(location)

    def path(self, key: str) -> str:
        return storage.join(self.location, key[:2], f"{key}.json")

    def get(self, key: str) -> Optional[dict]:
        try:
            return json.loads(storage.read_bytes(self.path(key)))
        except DataError:
            return None
        except ValueError:  # a torn file cannot happen with atomic writes; treat as a miss
            return None

    def put(self, key: str, entry: dict) -> None:
        storage.write_bytes_atomic(self.path(key), json.dumps(entry).encode("utf-8"))

    def keys(self) -> set[str]:
        fs, root = storage.resolve(self.location)
        import pyarrow.fs as pafs

        if fs.get_file_info(root).type != pafs.FileType.Directory:
            return set()
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        return {i.base_name[:-5] for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".json")
                and not storage.is_temp(i.base_name)}
