"""What a teacher call can fail with: user-facing errors naming the upstream and status (subq.errors.SubqError)."""

from __future__ import annotations

import re
from typing import Optional

from subq.errors import SubqError


class TeacherError(SubqError):
    """A teacher call failed. `upstream` is the base URL, `status` the HTTP status (None: no reply)."""

    def __init__(self, message: str, *, upstream: str, status: Optional[int] = None, hint: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message, source=upstream, hint=hint)
        self.upstream = upstream
        self.status = status
        self.code = code  # the provider's error code when it sent one (e.g. context_length_exceeded)


class TeacherAuthError(TeacherError):
    """401/403: the key is missing, wrong or lacks access. Not retried; stops a job at once."""


class TeacherRequestError(TeacherError):
    """400/404/422 and other 4xx: the request itself was refused. Not retried. `fatal` (an unknown model: every
    call would fail) stops a job; anything else (context length, a content filter) concerns one request only."""

    @property
    def fatal(self) -> bool:
        return self.status == 404 or (self.code or "") == "model_not_found"


class TeacherUnavailableError(TeacherError):
    """Retries exhausted on 429/5xx/timeouts/connection errors (serving maps it to HTTP 502)."""


class TeacherMalformedError(TeacherUnavailableError):
    """Every re-sampled reply failed validation."""


class TeacherStopped(TeacherError):
    """The cluster limiter refused the call: the job is stopping (another actor hit a fatal error)."""


class TeacherBudgetExceeded(TeacherStopped):
    """The job's spending cap (held by the budget actor) was reached before this call was sent."""


_KEYLIKE = re.compile(r"sk-[A-Za-z0-9_\-*]{3,}")


def _upstream_code(e) -> Optional[str]:
    body = getattr(e, "body", None)
    err = body.get("error", body) if isinstance(body, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    return str(code) if code else None


def _upstream_message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
    return str(getattr(e, "message", "") or e)[:300]
