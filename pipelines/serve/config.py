"""The Serve app's settings: `ServeConfig` (replicas, batching, limits, keys, datasets) and per-key `Quotas`."""

import math
import re
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from subq.settings import DecomposerSettings, SolverSettings, follow_reserved_gpus


class Quotas(BaseModel):
    """Per-key limits (None: no limit). Over one: HTTP 429 + Retry-After in OpenAI's error shape."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    requests_per_minute: Optional[float] = Field(None, gt=0, description="Requests per minute (sliding 60 s window).")
    max_running_evaluations: Optional[int] = Field(None, ge=1, description="Evaluations running at once per key.")
    max_stored_evaluations: Optional[int] = Field(100, ge=1, description="Evaluations kept per key (running or finished); DELETE frees one.")
    usd_per_day: Optional[float] = Field(None, gt=0, description="$ per UTC day across /v1/solve, chat and evaluations.")


class ServeConfig(BaseModel):
    """Everything `subq serve` / `serve deploy` needs. Nested `decomposer` and `solver` are shared with `subq eval`."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="HTTP bind address of the Serve proxy.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy.")
    app_name: str = Field("subq", description="Serve application name.")
    route_prefix: str = Field("/", description="Route prefix of the application.")
    decomposer: DecomposerSettings = Field(default_factory=DecomposerSettings, description="The distilled decomposer.")
    solver: SolverSettings = Field(default_factory=SolverSettings, description="The solver.")
    max_batch_size: int = Field(8, ge=1, description="@serve.batch max batch size of the decomposer.")
    batch_wait_timeout_s: float = Field(0.2, ge=0, description="@serve.batch wait for a batch to fill (requests reach the "
                                        "replica spread out by the proxy and ingress; a decode takes seconds).")
    decomposer_max_ongoing_requests: int = Field(16, ge=1, description="Per-replica concurrent requests (>= max_batch_size).")
    decomposer_min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound.")
    decomposer_max_replicas: int = Field(2, ge=1, description="Autoscaling upper bound.")
    decomposer_num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per decomposer replica; it decodes with "
                                       "that many torch threads (rounded down, at least 1).")
    decomposer_num_gpus: float = Field(0.0, ge=0, description="GPUs per decomposer replica; > 0 puts the model on cuda (bf16 where supported).")
    solver_max_ongoing_requests: int = Field(64, ge=1, description="Solver calls in flight per replica (they wait on I/O).")
    solver_min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound.")
    solver_max_replicas: int = Field(2, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(4.0, gt=0, description="Autoscaling target of in-flight requests per replica.")
    ingress_max_ongoing_requests: int = Field(64, ge=1, description="Concurrent HTTP requests per ingress replica.")
    max_queued_requests: int = Field(64, ge=1, description="Requests queued beyond that before HTTP 503 + Retry-After.")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After seconds sent with 503 (overload).")
    max_request_bytes: int = Field(1_000_000, ge=1024, description="Bodies larger than this get HTTP 413.")
    max_problem_chars: int = Field(8000, ge=1, description="Longer problems / messages get HTTP 400 naming the field.")
    max_eval_problems: int = Field(2000, ge=1, description="Largest `limit` an evaluation may ask for (items per evaluation).")
    eval_concurrency: int = Field(8, ge=1, description="Items in flight per running evaluation.")
    max_answer_chars: int = Field(2000, ge=1, description="Longer gold answers (solve, inline records) get HTTP 400.")
    max_sub_questions: int = Field(20, ge=1, description="Most sub-questions a /v1/solve request may give.")
    max_sub_question_chars: int = Field(1000, ge=1, description="Longer given sub-questions get HTTP 400.")
    max_inline_problems: int = Field(500, ge=1, description="Most problems an evaluation may carry inline (`records`).")
    max_running_evaluations: int = Field(4, ge=1, description="Evaluations running at once per server; more get HTTP 429 + Retry-After.")
    eval_retry_after_s: float = Field(30.0, ge=1, description="Retry-After seconds sent with that 429.")
    max_eval_cost_usd: float = Field(5.0, gt=0, allow_inf_nan=False, description="$ cap per evaluation: no new item starts once it is spent.")
    eval_ttl_s: float = Field(7 * 86400, gt=0, description="Finished evaluations older than this are evicted (memory and results root).")
    eval_retries: int = Field(5, ge=0, description="Retries (jittered exponential backoff) of an item's call that got 503/429 from a deployment or 429/5xx from the solver; an item that still fails is an error, excluded from accuracy.")
    eval_retry_backoff_s: float = Field(0.5, ge=0, description="Backoff multiplier of those retries.")
    datasets: dict[str, str] = Field(default_factory=dict, description="Datasets clients may name, beside the built-in splits: NAME -> local path or URI (read by the server; clients only ever send NAME).")
    results_root: str = Field("~/.cache/subq/serve-evaluations", description="Where evaluations are written (one directory per evaluation id; survives an ingress restart).")
    api_keys_env: Optional[str] = Field("SUBQ_API_KEYS", description="Env var with the API keys clients must send as `Authorization: Bearer` (comma-separated). No keys: no auth.")
    api_keys_file: Optional[str] = Field(None, description="File with API keys: one a line, or YAML/JSON `keys: [{name, key | key_env, admin, quotas}]` (added to api_keys_env's; pipelines.serve_auth).")
    insecure: bool = Field(False, description="Allow a non-loopback host without API keys (e.g. behind an authenticating proxy).")
    quotas: "Quotas" = Field(default_factory=lambda: Quotas(), description="Per-key limits (each key's `quotas` in the key file override them; a keyless server's callers share one).")
    max_usd_per_day: Optional[float] = Field(None, gt=0, allow_inf_nan=False, description="$ the whole server may spend per UTC day (solve, chat, evaluations); then HTTP 429.")
    allowed_hosts: Optional[list[str]] = Field(None, description="Host header values answered (`*.example.com` wildcards). Default: loopback names on a keyless loopback server, any otherwise.")
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed cross-origin (CORS); empty: closed.")
    decode_temperatures: list[float] = Field([0.3, 0.7, 1.0], min_length=1, description="Unused since requests' temperatures are decoded exactly, per row of one batch (issue 28); kept so existing configs load.")
    decode_betas: list[float] = Field([0.0, 0.5, 1.0, 2.0], min_length=1, description="ILQL betas a request may get (rounded to the nearest, the server's own beta added).")

    @field_validator("decode_temperatures", "decode_betas")
    @classmethod
    def _finite(cls, v: list) -> list:
        if not all(math.isfinite(x) for x in v):
            raise ValueError("values must be finite")
        return v

    @field_validator("datasets")
    @classmethod
    def _names(cls, v: dict) -> dict:
        from subq.problems import NAMED_SOURCES

        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,100}", name) or name in NAMED_SOURCES:
                raise ValueError(f"dataset name {name!r} must be letters, digits, '_.:-' and not a built-in name")
        return v

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if self.decomposer_max_ongoing_requests < self.max_batch_size:
            raise ValueError("decomposer_max_ongoing_requests must be >= max_batch_size, or batches never fill")
        if self.decomposer_max_replicas < max(1, self.decomposer_min_replicas):
            raise ValueError("decomposer_max_replicas must be >= decomposer_min_replicas")
        if self.solver_max_replicas < max(1, self.solver_min_replicas):
            raise ValueError("solver_max_replicas must be >= solver_min_replicas")
        follow_reserved_gpus(self.decomposer, self.decomposer_num_gpus)
        return self
