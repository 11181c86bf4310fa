"""Ray Jobs API access for subq: an authenticated `JobSubmissionClient`, and list / logs / stop / wait.

    subq jobs list   --address http://127.0.0.1:8265
    subq jobs logs   raysubmit_XXXX [--follow]
    subq jobs stop   raysubmit_XXXX
    # the same with Ray's own CLI (it finds the token the same ways):
    ray job list --address http://127.0.0.1:8265

The address comes from `--address`, else `RAY_ADDRESS`, else http://127.0.0.1:8265. Authentication: see
cluster/auth.py. A refused request becomes one `error:` line that says what to do.
"""

from __future__ import annotations

import os
import time
from typing import Optional

from cluster import auth
from subq.errors import SubqError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def resolve_address(address: Optional[str]) -> str:
    """--address, else $RAY_ADDRESS, else the local dashboard; `ray://` and bare host:port become http://."""
    addr = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if addr == "auto":
        addr = DEFAULT_ADDRESS
    if addr.startswith("ray://"):
        raise SubqError(f"{addr} is a Ray Client address; the Jobs API needs the dashboard's http://HOST:8265",
                        field="--address")
    if "://" not in addr:
        addr = "http://" + addr
    return addr


def _auth_status(exc: BaseException) -> Optional[int]:
    text = str(exc)
    if "Missing authentication token" in text or "Authentication required" in text:
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
