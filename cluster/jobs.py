"""Ray Jobs API access for subq: an authenticated `JobSubmissionClient`, and list / logs / stop / wait.

    subq jobs list   --address http://127.0.0.1:8265
    subq jobs logs   raysubmit_XXXX [--follow]
    subq jobs stop   raysubmit_XXXX
    # the same with Ray's own CLI (it finds the token the same ways):
    ray job list --address http://127.0.0.1:8265

The address comes from `--address`, else `RAY_API_SERVER_ADDRESS`, else `RAY_ADDRESS` when it is http(s)://
(a GCS `RAY_ADDRESS` is asked for its dashboard), else http://127.0.0.1:8265 (`resolve_address`). A driver
address (GCS, ray://) for local verbs is cluster/connect.py's business. Authentication: see cluster/auth.py. A refused request becomes one `error:` line that says what to do.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Optional

from cluster import auth
from subq.errors import SubqError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def resolve_address(address: Optional[str] = None, environ: Optional[dict] = None) -> str:
    """The Jobs API (dashboard) URL, the way Ray's own SDK finds it: `--address`, else $RAY_API_SERVER_ADDRESS,
    else $RAY_ADDRESS when it is http(s)://; a GCS / `ray://` / `auto` RAY_ADDRESS is asked for its dashboard
    (Ray's lookup); else http://127.0.0.1:8265. A bare HOST:PORT given as --address / RAY_API_SERVER_ADDRESS is
    the dashboard (http://HOST:PORT)."""
    env = os.environ if environ is None else environ
    addr = address or env.get(API_SERVER_ENV) or None
    source = "--address" if address else API_SERVER_ENV
    if not addr:
        ray_addr = (env.get("RAY_ADDRESS") or "").strip()
        if ray_addr and ray_addr != "local" and not ray_addr.lower().startswith(("http://", "https://")):
            return _dashboard_of(ray_addr)
        addr, source = (ray_addr if ray_addr and ray_addr != "local" else DEFAULT_ADDRESS), "RAY_ADDRESS"
    if addr.startswith("ray://"):
        return _dashboard_of(addr)
    if addr == "auto":
        return _dashboard_of(addr)
    if "://" not in addr:
        addr = "http://" + addr
    if not addr.lower().startswith(("http://", "https://")):
        raise SubqError(f"{source} {addr} is not a Jobs API address (http(s)://HOST:8265)", field=source)
    return addr.rstrip("/")


def _dashboard_of(ray_address: str) -> str:
    """Ray's own lookup of the dashboard URL of the cluster at a GCS / ray:// / auto address."""
    from ray.dashboard.utils import ray_address_to_api_server_url, ray_client_address_to_api_server_url

    try:
        if ray_address.startswith("ray://"):
            return ray_client_address_to_api_server_url(ray_address)
        return ray_address_to_api_server_url(ray_address)
    except Exception as e:  # noqa: BLE001
        raise SubqError(f"cannot find the Jobs API of the Ray cluster at {ray_address} "
                        f"({type(e).__name__})", field="--address",
                        hint="pass the dashboard address: --address http://HEAD:8265 or RAY_API_SERVER_ADDRESS") from None


@contextlib.contextmanager
def _without_address_env():
    """JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its `address` argument; we resolve
    the address ourselves (resolve_address), so hide them while it is built."""
    saved = {k: os.environ.pop(k) for k in (API_SERVER_ENV, "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _auth_status(exc: BaseException) -> Optional[int]:
    text = str(exc)
    if ("Missing authentication token" in text or "Authentication required" in text
            or "couldn't find an authentication token" in text):  # the last: Ray's client, when it expects auth
        return 401
    if "Invalid authentication token" in text or "Authentication failed" in text:
        return 403
    return None


class Jobs:
    """Thin wrapper over `ray.job_submission.JobSubmissionClient` turning auth/connection failures into
    SubqError. `client` is the underlying JobSubmissionClient (for anything not wrapped here)."""

    def __init__(self, address: Optional[str] = None):
        from ray.job_submission import JobSubmissionClient

        self.address = resolve_address(address)
        self.token = auth.find_token()
        try:
            with _without_address_env():
                self.client = JobSubmissionClient(self.address, headers=auth.auth_headers(self.token))
        except Exception as e:  # noqa: BLE001 - classify, never leak the token
            raise self._error(e) from None

    def _error(self, e: BaseException) -> SubqError:
        status = _auth_status(e)
        if status:
            return auth.explain(status, self.address, self.token)
        if isinstance(e, SubqError):
            return e
        if "Failed to connect" in str(e) or "Connection" in type(e).__name__ or "Connection refused" in str(e):
            return SubqError(f"cannot reach a Ray dashboard at {self.address}", field="--address",
                             hint="start one with `ray start --head` or pass --address / RAY_ADDRESS")
        return SubqError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", field="--address")

    def call(self, name: str, *args, **kwargs):
        try:
            return getattr(self.client, name)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            if isinstance(e, RuntimeError) and "does not exist" in str(e):
                raise SubqError(str(e), field="JOB_ID") from None
            raise self._error(e) from None

    def list(self) -> list:
        return self.call("list_jobs")

    def info(self, job_id: str):
        return self.call("get_job_info", job_id)

    def logs(self, job_id: str) -> str:
        return self.call("get_job_logs", job_id)

    def stop(self, job_id: str) -> bool:
        return self.call("stop_job", job_id)

    def wait(self, job_id: str, timeout_s: Optional[float] = None, poll_s: float = 1.0) -> str:
        """Poll until the job is SUCCEEDED / FAILED / STOPPED (returns that status) or timeout_s passes."""
        t0 = time.monotonic()
        while True:
            status = str(self.call("get_job_status", job_id).value)
            if status in TERMINAL:
                return status
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise SubqError(f"job {job_id} still {status} after {timeout_s:.0f}s", field="--timeout")
            time.sleep(poll_s)

    def follow(self, job_id: str, write) -> None:
        """Stream the job's logs to `write` until it ends."""
        import asyncio

        async def tail():
            async for chunk in self.client.tail_job_logs(job_id):
                write(chunk)

        try:
            asyncio.run(tail())
        except Exception as e:  # noqa: BLE001
            raise self._error(e) from None
