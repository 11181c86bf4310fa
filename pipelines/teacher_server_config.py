"""`TeacherServerConfig`: every setting of the local provider-like teacher server (pipelines.teacher_server), in
one place: `subq teacher-server`'s flags, its `--config` YAML, `python -m pipelines.teacher_server` and
`TeacherServer(**kw)` all derive from it (subq.cli_options). Light imports only, so the CLI starts fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from subq.errors import ConfigError


def _f(default, description: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"description": description}, **kw)
    return field(default=default, metadata={"description": description}, **kw)


@dataclass
class TeacherServerConfig:
    """A provider-like OpenAI-compatible server: rate limits, latency, injected faults, the Batch API, a bill."""

    host: str = _f("127.0.0.1", "Interface to bind.")
    port: int = _f(8300, "TCP port.")
    rpm: Optional[float] = _f(None, "Requests/minute limit (429 + Retry-After beyond it); none: unlimited.")
    tpm: Optional[float] = _f(None, "Tokens/minute limit, prompt + max_tokens charged up front; none: unlimited.")
    burst_s: float = _f(1.0, "Bucket capacity in seconds of the limit (a small burst, like real providers' smoothing).")
    latency_s: float = _f(0.0, "Mean reply latency, seconds.")
    latency_jitter_s: float = _f(0.0, "Std-dev of the latency, seconds (normal, clipped at 0).")
    fail_rate: float = _f(0.0, "Share of requests answered 500/503.")
    malformed_rate: float = _f(0.0, "Share answered 200 with an unparseable reply (billed: the tokens were generated).")
    malformed_body_share: float = _f(0.5, "Share of the malformed replies that are a truncated body (the rest: a "
                                          "readable reply in no expected format).")
    timeout_rate: float = _f(0.0, "Share that hang for timeout_hang_s, then 504.")
    timeout_hang_s: float = _f(30.0, "How long a 'timeout' request hangs, seconds.")
    batch_api: bool = _f(True, "Serve the Batch API (/v1/files, /v1/batches: pipelines.teacher_batch); off: 404.")
    batch_delay_s: float = _f(1.0, "Processing time of one batch, seconds.")
    batch_error_rate: float = _f(0.0, "Share of batch requests answered with a per-request 500 (error file).")
    batch_malformed_rate: float = _f(0.0, "Share of batch requests answered 200 with a reply in no expected format.")
    batch_expire_first: int = _f(0, "The first N batches expire after half their requests.")
    batch_bad_output_first: int = _f(0, "The first N completed batches get a bad output file (batch_bad_output).")
    batch_bad_output: Literal["malformed", "missing"] = _f("malformed", "What a bad output file is: a broken line, "
                                                                         "or content answering 404.")
    batch_upload_fail_first: int = _f(0, "The first N file uploads answer 500.")
    api_key: Optional[str] = _f(None, "If set, requests need `Authorization: Bearer <it>` (401 otherwise). Never a "
                                      "flag: `--require-key-env` names the variable holding it.")
    models: Optional[list[str]] = _f(None, "Serve only these model names (404 otherwise); none: any name.")
    seed: int = _f(0, "RNG seed for faults, latency and unrecorded choices.")
    reject_problems: Optional[list[str]] = _f(None, "Prompts containing any of these texts get a 400, as a "
                                                    "provider refuses one request (context length, content filter).")
    record_prompts: bool = _f(False, "Keep every answered chat call's messages and reply (GET /v1/prompts; tests).")

    def __post_init__(self):
        for name in ("fail_rate", "malformed_rate", "timeout_rate", "malformed_body_share", "batch_error_rate",
                     "batch_malformed_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError("must be between 0 and 1", field=name)
        if self.fail_rate + self.malformed_rate + self.timeout_rate > 1:
            raise ConfigError("fault rates add up to more than 1", field="fail_rate")
        if self.batch_bad_output not in ("malformed", "missing"):
            raise ConfigError("expected malformed or missing", field="batch_bad_output")
        for name in ("rpm", "tpm"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError("must be > 0 (or none: unlimited)", field=name)
