"""Ray Serve app: a distilled decomposer next to an (expensive) solver, composed by a FastAPI ingress.

Run it:

    subq serve --decomposer-path ckpt/bc --solver-base-url http://127.0.0.1:8100/v1 --solver-model gpt-3.5-turbo
    serve deploy pipelines/serve_config.yaml             # on a running cluster (`ray start --head` first)
    serve run pipelines.serve:app_builder decomposer.path=ckpt/bc   # ad hoc, from a shell
    ray job submit --working-dir . -- python -m pipelines.serve_cmd --config pipelines/serve_config.yaml

Deployments (one application, default name `subq`):
- `Decomposer` (DecomposerDeployment): loads a BC/FBC/ILQL checkpoint with `training.decomposer.load_decomposer`
  and decodes with `generate_subquestions` (ILQL-guided with `beta`); requests are batched with `@serve.batch`
  (`max_ongoing_requests >= max_batch_size` is enforced) and the deployment autoscales.
- `Solver` (SolverDeployment): `pipelines.evaluate.Solver`: the paper QA / DoC solve prompt through any
  OpenAI-compatible endpoint (actors.teacher.TeacherClient: openai SDK, retries, cluster limiter) or a local HF model.
- `Ingress`: FastAPI. `POST /v1/decompose`, `POST /v1/solve`, `POST /v1/evaluations`, `GET /v1/evaluations/{id}`,
  `GET /v1/evaluations/{id}/paper_raw`, `GET /healthz`, OpenAI-compatible `POST /v1/chat/completions` and
  `GET /v1/models` for the locally served models; `GET /v1/evaluations`, `DELETE /v1/evaluations/{id}` (cancels).
  Errors are OpenAI's error object `{"error": {"message", "type", "param", "code"}}` (+ `upstream` for 502s);
  `stream=true` chat completions are server-sent `chat.completion.chunk` events ending with `data: [DONE]`.

Exposed to a team (pipelines.serve_auth): API keys (`Authorization: Bearer`, SHA-256 digests compared in constant
time) on every route but /healthz; a non-loopback host needs keys or `insecure`; bodies capped on bytes actually
read; every text field length-checked; non-finite numbers 400 (every validation error is OpenAI's 400
`invalid_request_error` naming `param`; no route answers 422). Evaluations name a dataset from the registry
(built-in splits + `datasets`) or carry problems inline, never a path or URI; results go under `results_root` by
evaluation id (pipelines.eval_store: items written as they finish; after an ingress restart finished evaluations
are served and running ones marked interrupted); limits on running evaluations (429 + Retry-After), items and $
per evaluation, TTL eviction; a deployment's 503/429 or the solver's 429/5xx is retried inside an evaluation, and an
item that still fails is an error, excluded from accuracy.

Python API: `ServeConfig`, `build_app(config) -> Application`, `app_builder(args)` (for `serve deploy`),
`start_serve(config) -> base_url`, `stop_serve()`.
"""



import asyncio
import json
import logging
import math
import os
import re
import sys
import time
import uuid
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.eval_store import EvalStore
from pipelines.serve_auth import (
    GuardMiddleware, bound_hosts, check_exposure, current_caller, current_request_id, error_body, guard,
    is_loopback, ledger, load_key_entries, set_guard,
)

from pipelines.evaluate import (
    Answer, Decomposition, DecomposerSettings, ItemResult, LocalDecomposer, Solver, SolverSettings, StageUsage,
    UpstreamError, fail_item, finish_item, follow_reserved_gpus, items_to_rows, new_item, summarize_items, write_report,
)
from subq.errors import SubqError
from subq.parsers import format_subquestions, parse_answers
from subq.scoring import MODES

# ---------------------------------------------------------------- config


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


# ---------------------------------------------------------------- deployments


def _chat_response(model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    """A chat.completion built from the openai package's types. choices: {"text": what the model generated,
    "finish_reason": "stop" | "length"} and, from the decomposer, "sub_questions" (the text parsed with the
    checkpoint's format): our extension field on each choice, next to `message`."""
    from openai.types.chat import ChatCompletion, ChatCompletionMessage
    from openai.types.chat.chat_completion import Choice
    from openai.types.completion_usage import CompletionUsage

    out = ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex[:24]}", object="chat.completion", created=int(time.time()), model=model,
        choices=[Choice(index=i, message=ChatCompletionMessage(role="assistant", content=c["text"]),
                        finish_reason=c["finish_reason"]) for i, c in enumerate(choices)],
        usage=CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                              total_tokens=prompt_tokens + completion_tokens),
    ).model_dump(mode="json", exclude_none=True)
    for c, o in zip(choices, out["choices"]):
        if "sub_questions" in c:
            o["sub_questions"] = c["sub_questions"]
    return out


def problem_from_messages(msgs: list[dict]) -> str:
    """The problem in a chat request to the decomposer: the last user message, after its last `Problem:` (the
    paper's QG prompt) or `Question:` (DoC's decompose prompt) marker when present, so our decomposer can stand
    in for the teacher's QG calls."""
    users = [m for m in msgs if m.get("role") == "user"]
    text = (users[-1] if users else msgs[-1]).get("content") or ""
    if isinstance(text, list):  # content parts
        text = " ".join(p.get("text", "") for p in text if isinstance(p, dict))
    for marker in ("Problem:", "Question:"):
        if marker in text:
            return text.rsplit(marker, 1)[1].strip()
    return text.strip()


def _err(stage: str, e: BaseException) -> dict:
    out = {"ok": False, "stage": stage, "error": str(e) or type(e).__name__, "type": type(e).__name__}
    if isinstance(e, UpstreamError):
        out.update(upstream=e.upstream, status=e.status)
    return out


ROW_SETTINGS = ("max_new_tokens", "do_sample", "temperature", "top_p", "stop", "seed", "n")  # per row: never split a batch


@serve.deployment(name="Decomposer")
class DecomposerDeployment:
    """The distilled decomposer, batched. Methods return plain dicts; errors come back as {"ok": False, ...}
    so a bad request never takes the replica down."""

    def __init__(self, settings: dict, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.2,
                 num_threads: int = 1, temperatures: Optional[list[float]] = None, betas: Optional[list[float]] = None):
        import torch

        torch.set_num_threads(num_threads)  # the CPUs Ray reserved for this replica (decomposer_num_cpus), no more
        self.settings = DecomposerSettings(**settings)
        self.local = LocalDecomposer(self.settings)
        from training.config import native_bf16

        if self.settings.device.startswith("cuda") and native_bf16(self.settings.device):  # not on T4/V100 (emulated)
            self.local.model.model.to(torch.bfloat16)  # the LM in bf16 (ILQL heads cast its states to their dtype)
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: list[int] = []
        self.batch_groups: list[int] = []  # generate calls per batch (one per distinct decoding setting)
        cfg = self.local.model.model.config
        self.context = int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 2048)
        self.temperatures = sorted(temperatures or [0.3, 0.7, 1.0])
        self.betas = sorted({*(betas or [0.0, 0.5, 1.0, 2.0]), float(self.settings.beta)} if self.settings.beta is not None
                            else set(betas or [0.0, 0.5, 1.0, 2.0]))

    def _normalize(self, params: dict) -> dict:
        """A request's decoding settings, complete. Budget, sampling, temperature, top_p, stop sequences, seed and n
        are per row in one generate call (training.decomposer.generate_subquestions), so they never split a batch
        and are honoured exactly; only beta (not an OpenAI field) splits it, so it is rounded to the nearest allowed
        value. max_new_tokens is clamped to half the model's context (the prompt keeps the other half; past the
        position table the model cannot decode)."""
        out = {k: v for k, v in params.items() if v is not None}
        s = self.settings
        out["do_sample"] = bool(out.get("do_sample", s.do_sample))
        out["temperature"] = float(out.get("temperature") or s.temperature) if out["do_sample"] else 1.0
        if "beta" in out:
            out["beta"] = min(self.betas, key=lambda b: (abs(b - out["beta"]), b))
        n = int(out.get("max_new_tokens") or s.max_new_tokens)
        out["max_new_tokens"] = max(1, min(n, self.context // 2))
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.2)
    async def _batched(self, requests: list[tuple]) -> list[dict]:
        self.batch_sizes.append(len(requests))
        # one generate call per beta in the batch; every other setting is per row (a request's n samples are n rows,
        # sample j seeded seed + j)
        groups: dict[str, list[int]] = {}
        for i, (_, params) in enumerate(requests):
            groups.setdefault(json.dumps({k: v for k, v in params.items() if k not in ROW_SETTINGS},
                                         sort_keys=True), []).append(i)
        self.batch_groups.append(len(groups))
        results: list[Optional[dict]] = [None] * len(requests)
        for key, idx in groups.items():
            rows: dict[str, list] = {k: [] for k in ("problems", "max_new_tokens", "do_sample", "temperature",
                                                      "top_p", "stop", "seed")}
            for i in idx:
                problem, p = requests[i]
                for j in range(p.get("n", 1)):
                    rows["problems"].append(problem)
                    for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "stop"):
                        rows[k].append(p.get(k))
                    rows["seed"].append(None if p.get("seed") is None else p["seed"] + j)
            try:
                decs = await asyncio.to_thread(self.local.decompose_batch, rows.pop("problems"), **rows,
                                               **json.loads(key))
                at = 0
                for i in idx:
                    n = requests[i][1].get("n", 1)
                    choices = [{"questions": d.questions, "text": d.text, "usage": d.usage.to_dict(),
                                "finish_reason": d.finish_reason} for d in decs[at:at + n]]
                    at += n
                    results[i] = {"ok": True, **choices[0], "choices": choices}
            except Exception as e:  # noqa: BLE001 - reported per request
                for i in idx:
                    results[i] = _err("decompose", e)
        return results

    async def decompose(self, problem: str, params: Optional[dict] = None) -> dict:
        return await self._batched((problem, self._normalize(params or {})))

    async def chat(self, body: dict) -> dict:
        """An OpenAI chat request (validated by the Ingress: ChatRequest) -> {"ok", "response": chat.completion}."""
        params = {"max_new_tokens": body.get("max_completion_tokens") or body.get("max_tokens"),
                  "top_p": body.get("top_p"), "stop": body.get("stop") or None, "seed": body.get("seed"),
                  "n": body.get("n") if (body.get("n") or 1) > 1 else None}
        temp = body.get("temperature")
        if temp is not None:
            params.update(do_sample=temp > 0, temperature=temp if temp > 0 else None)
        res = await self.decompose(problem_from_messages(body["messages"]), params)
        if not res["ok"]:
            return res
        ch = res["choices"]  # n samples of one prompt: its tokens counted once, the completions' summed
        choices = [{"text": c["text"], "finish_reason": c["finish_reason"], "sub_questions": c["questions"]} for c in ch]
        return {"ok": True, "response": _chat_response(self.settings.name, choices, ch[0]["usage"]["prompt_tokens"],
                                                      sum(c["usage"]["completion_tokens"] for c in ch)),
                "cost_usd": sum(c["usage"].get("cost_usd", 0.0) for c in ch)}

    def stats(self) -> dict:
        import torch

        return {"batch_sizes": list(self.batch_sizes), "batch_groups": list(self.batch_groups),
                "torch_threads": torch.get_num_threads()}


@serve.deployment(name="Solver")
class SolverDeployment:
    """The solver: answers (and, in `teacher` mode, writes the decomposition) through the configured backend."""

    def __init__(self, settings: dict):
        self.settings = SolverSettings(**settings)
        self.solver = Solver(self.settings)

    async def answer(self, problem: str, questions: list[str]) -> dict:
        try:
            a = await self.solver.answer(problem, questions)
            return {"ok": True, "text": a.text, "usage": a.usage.to_dict()}
        except Exception as e:  # noqa: BLE001
            return _err("solve", e)

    async def decompose(self, problem: str) -> dict:
        try:
            d = await self.solver.decompose(problem)
            return {"ok": True, "questions": d.questions, "text": d.text, "usage": d.usage.to_dict()}
        except Exception as e:  # noqa: BLE001
            return _err("decompose", e)

    async def chat(self, body: dict) -> dict:
        try:
            budget = body.get("max_completion_tokens") or body.get("max_tokens") or self.settings.max_tokens
            if self.settings.backend == "local":  # clamped to half the model's context (the prompt keeps the rest)
                _, model = await asyncio.to_thread(self.solver._local_model)
                ctx = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
                budget = max(1, min(int(budget), int(ctx) // 2))
            text, u = await self.solver.chat(body["messages"], temperature=body.get("temperature"), max_tokens=budget)
            finish = "length" if u.completion_tokens >= budget else "stop"  # the budget ran out (or its last was EOS)
            return {"ok": True, "response": _chat_response(self.settings.name, [{"text": text, "finish_reason": finish}],
                                                          u.prompt_tokens, u.completion_tokens),
                    "cost_usd": getattr(u, "cost_usd", 0.0)}
        except Exception as e:  # noqa: BLE001
            return _err("solve", e)


# ---------------------------------------------------------------- HTTP API


class ApiError(Exception):
    """An HTTP error in OpenAI's error shape. `upstream_status`: the solver upstream's HTTP status, if any."""

    def __init__(self, status: int, message: str, *, field: Optional[str] = None, type_: str = "invalid_request_error",
                 code: Optional[str] = None, upstream: Optional[str] = None, headers: Optional[dict] = None,
                 upstream_status: Optional[int] = None):
        self.status, self.message, self.field, self.type, self.code = status, message, field, type_, code
        self.upstream, self.headers, self.upstream_status = upstream, headers or {}, upstream_status


api = FastAPI(title="subq", description="Distilled decomposer + solver, on Ray Serve.")
api.add_middleware(GuardMiddleware)


log = logging.getLogger("ray.serve")


@api.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError):
    rid = current_request_id() if e.status >= 500 else None  # the log has the details under this id
    status = 400 if e.status == 422 else e.status  # OpenAI's status for a bad request: no route answers 422
    return JSONResponse(error_body(e.message, e.type, e.field, e.code or ("invalid_value" if status == 400 else None),
                                   request_id=rid), status_code=status, headers=e.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return JSONResponse(error_body(str(e.detail), "invalid_request_error", None, code), status_code=e.status_code,
                        headers=getattr(e, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError):
    errs = e.errors()
    first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    field = ".".join(loc) or "body"
    if first.get("type") == "json_invalid":
        msg = f"malformed JSON: {first.get('msg')} (at {first.get('ctx', {}).get('error', '')})".strip()
        return JSONResponse(error_body(msg, "invalid_request_error", "body", "invalid_json"), status_code=400)
    msg = first.get("msg", "invalid value")
    kind = first.get("type")
    code = {"extra_forbidden": "unknown_parameter", "missing": "missing_required_parameter"}.get(kind, "invalid_value")
    if kind == "extra_forbidden":
        msg = "unrecognized request argument (not an OpenAI field, or one this server does not know)"
    # OpenAI's status and shape for every invalid request (the SDK raises BadRequestError with .param and .code)
    return JSONResponse(error_body(f"field '{field}': {msg}", "invalid_request_error", field, code), status_code=400)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _nonempty(v: str, field: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{field} must be a non-empty string")
    return v


class DecomposeRequest(_Strict):
    problem: str = Field(..., description="The math word problem.")
    beta: Optional[float] = Field(None, ge=-100, le=100, description="ILQL guidance weight (default: the server's).")
    do_sample: Optional[bool] = Field(None, description="Sample instead of greedy.")
    temperature: Optional[float] = Field(None, gt=0, le=10, description="Sampling temperature.")
    max_new_tokens: Optional[int] = Field(None, gt=0, le=4096, description="Max generated tokens.")

    _p = field_validator("problem")(lambda v: _nonempty(v, "problem"))


Decomposer = Literal["distilled", "teacher", "none"]


def _bounded_list(v: Any, field: str, item_type: type, what: str) -> Any:
    """Type and size of a list checked before its elements are validated one by one: a 1 MB `[0, 0, ...]` costs
    one error, not one error object per element."""
    if v is None:
        return v
    if not isinstance(v, list):
        raise ValueError(f"{field} must be a list of {what}")
    limit = int((guard() or {}).get("max_list_items") or 500)
    if len(v) > limit:
        raise ValueError(f"{len(v)} items; the limit is {limit} (max_inline_problems)")
    for i, x in enumerate(v):
        if not isinstance(x, item_type):
            raise ValueError(f"item {i} must be {what}, got {type(x).__name__}")
    return v


class SolveRequest(_Strict):
    problem: str = Field(..., description="The math word problem.")
    decomposer: Decomposer = Field("distilled", description="distilled (our model), teacher (the solver endpoint's QG), none (single-stage).")
    sub_questions: Optional[list[str]] = Field(None, description="Skip decomposition and use these sub-questions.")
    gold_answer: Optional[str] = Field(None, description="If given, the reply is scored in every mode.")

    _p = field_validator("problem")(lambda v: _nonempty(v, "problem"))
    _q = field_validator("sub_questions", mode="before")(lambda v: _bounded_list(v, "sub_questions", str, "strings"))


class InlineProblem(_Strict):
    """One uploaded problem: a text (`question` or `problem`) and a gold answer (`answer`, `gold_answer` or
    `true_answer`: GSM8K's '... #### N' or a number)."""

    question: Optional[str] = None
    problem: Optional[str] = None
    answer: Optional[Union[str, float]] = None
    gold_answer: Optional[Union[str, float]] = None
    true_answer: Optional[Union[str, float]] = None

    @model_validator(mode="after")
    def _need(self) -> "InlineProblem":
        if not (self.question or self.problem or "").strip():
            raise ValueError("each record needs a non-empty `question` (or `problem`)")
        if self.gold() is None:
            raise ValueError("each record needs a gold answer (`answer`, `gold_answer` or `true_answer`)")
        return self

    def text(self) -> str:
        return self.question if self.question is not None else self.problem or ""

    def gold(self):
        for g in (self.answer, self.gold_answer, self.true_answer):
            if g is not None:
                return g
        return None


class EvaluationRequest(_Strict):
    dataset: Optional[str] = Field("gsm8k:test", max_length=200, description="A dataset NAME from the server's registry: the built-in splits (gsm8k:test, gsm8k:train, gsm8k:test_socratic, gsm8k-ai-subq:test) and the operator's `datasets`. Never a path or URI.")
    records: Optional[list[InlineProblem]] = Field(None, description="Problems inline instead of `dataset` (at most max_inline_problems).")
    decomposer: Decomposer = Field("distilled", description="distilled | teacher | none.")
    solver: Optional[str] = Field(None, max_length=200, description="Solver model id (must be the served solver's name; default: it).")
    scoring_mode: Literal["paper", "strict", "flexible"] = Field("paper", description="Headline mode; all modes are reported.")
    limit: int = Field(20, gt=0, description="Evaluate the first N problems (at most max_eval_problems).")
    max_cost_usd: Optional[float] = Field(None, gt=0, description="Stop once this much is spent (at most the server's max_eval_cost_usd).")
    exclude_few_shot: bool = Field(False, description="Drop the GSM8K test problems the paper's prompts quote as few-shot examples.")

    _r = field_validator("records", mode="before")(lambda v: _bounded_list(v, "records", dict, "objects"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)
    role: str = Field(..., max_length=32)
    content: Any = None


MAX_CHOICES, MAX_STOP, MAX_STOP_CHARS = 16, 4, 200


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: Optional[bool] = None
    include_obfuscation: Optional[bool] = None  # accepted; our chunks carry no obfuscation padding


def _stop_list(v: Any) -> Optional[list[str]]:
    if v is None:
        return None
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
        raise ValueError("stop must be a string or a list of strings")
    if len(stops) > MAX_STOP:
        raise ValueError(f"{len(stops)} stop sequences; at most {MAX_STOP}")
    if any(not x or len(x) > MAX_STOP_CHARS for x in stops):
        raise ValueError(f"stop sequences must be 1 to {MAX_STOP_CHARS} characters")
    return stops


class ChatRequest(BaseModel):
    """OpenAI's chat request. Every field is honoured, refused (`CHAT_REFUSED`: 400 naming it unless it has its
    no-op value) or accepted with no effect (`CHAT_IGNORED`: account, caching and routing hints OpenAI also accepts
    on every model); a field OpenAI does not define is 400 `unknown_parameter`, as OpenAI answers it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = Field(..., max_length=200)
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=64)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    max_tokens: Optional[int] = Field(None, gt=0, le=4096)
    max_completion_tokens: Optional[int] = Field(None, gt=0, le=4096)
    n: Optional[int] = Field(None, ge=1, le=MAX_CHOICES)
    seed: Optional[int] = Field(None, ge=-(2**62), le=2**62)
    stop: Optional[Any] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    # refused unless absent or their no-op value
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict] = None
    tools: Optional[list] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list] = None
    function_call: Optional[Any] = None
    response_format: Optional[dict] = None
    modalities: Optional[list] = None
    audio: Optional[Any] = None
    prediction: Optional[Any] = None
    web_search_options: Optional[Any] = None
    reasoning_effort: Optional[Any] = None
    verbosity: Optional[Any] = None
    moderation: Optional[Any] = None
    # accepted, no effect
    user: Optional[str] = Field(None, max_length=256)
    metadata: Optional[dict] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = Field(None, max_length=32)
    safety_identifier: Optional[str] = Field(None, max_length=256)
    prompt_cache_key: Optional[str] = Field(None, max_length=256)
    prompt_cache_retention: Optional[str] = Field(None, max_length=32)
    prompt_cache_options: Optional[Any] = None

    _s = field_validator("stop", mode="before")(lambda v: _stop_list(v))


# field -> (the values that do nothing, why it is refused otherwise); checked in this order
CHAT_REFUSED: dict[str, tuple[Any, str]] = {
    "tools": (lambda v: not v, "tool calling is not supported"),
    "tool_choice": (lambda v: v == "none", "tool calling is not supported"),
    "parallel_tool_calls": (lambda v: False, "only allowed with tools, which are not supported"),
    "functions": (lambda v: not v, "function calling is not supported"),
    "function_call": (lambda v: v == "none", "function calling is not supported"),
    "response_format": (lambda v: v.get("type") == "text", "only {'type': 'text'} is supported"),
    "logprobs": (lambda v: not v, "token log-probabilities are not returned"),
    "top_logprobs": (lambda v: False, "token log-probabilities are not returned"),
    "frequency_penalty": (lambda v: v == 0, "penalties are not supported"),
    "presence_penalty": (lambda v: v == 0, "penalties are not supported"),
    "logit_bias": (lambda v: not v, "logit_bias is not supported"),
    "modalities": (lambda v: list(v) == ["text"], "only text output"),
    "audio": (lambda v: False, "only text output"),
    "prediction": (lambda v: False, "predicted outputs are not supported"),
    "web_search_options": (lambda v: False, "web search is not supported"),
    "reasoning_effort": (lambda v: False, "not a reasoning model"),
    "verbosity": (lambda v: False, "not supported by this model"),
    "moderation": (lambda v: False, "moderation is not supported"),
}
CHAT_IGNORED = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                "prompt_cache_retention", "prompt_cache_options", "stream_options.include_obfuscation")
SOLVER_CHAT_REFUSED = ("n", "seed", "top_p", "stop")  # the local solver's chat path (HF generate) takes none of them


def chat_refusal(req: ChatRequest, solver: bool = False) -> Optional[ApiError]:
    """The first field of `req` we do not honour, as OpenAI's 400 naming it; None when every field is honoured."""
    for name, (noop, why) in CHAT_REFUSED.items():
        v = getattr(req, name)
        if v is not None and not noop(v):
            return ApiError(400, f"'{name}' is not supported: {why}", field=name, code="unsupported_parameter")
    if req.stream_options is not None and not req.stream:
        return ApiError(400, "'stream_options' is only allowed when 'stream' is true", field="stream_options",
                        code="invalid_value")
    if req.max_tokens and req.max_completion_tokens and req.max_tokens != req.max_completion_tokens:
        return ApiError(400, "max_tokens and max_completion_tokens differ: give one", field="max_completion_tokens",
                        code="invalid_value")
    if solver:
        for name in SOLVER_CHAT_REFUSED:
            v = getattr(req, name)
            if v is not None and not (name == "n" and v == 1) and not (name == "top_p" and v == 1):
                return ApiError(400, f"'{name}' is not supported by the local solver model (the decomposer model "
                                     f"supports it)", field=name, code="unsupported_parameter")
    return None


def _limit(text: Optional[str], limit: int, field: str, setting: str = "max_problem_chars") -> None:
    if text is not None and len(text) > limit:
        raise ApiError(400, f"field '{field}': {len(text)} characters; the limit is {limit} ({setting})", field=field,
                       code="string_too_long")


def _problem_limit(text: str, limit: int, field: str) -> None:
    _limit(text, limit, field)


RETRY_STATUSES = (429, 500, 502, 503, 504)


def _transient(e: BaseException) -> bool:
    """Worth retrying inside an evaluation: a deployment's 503/429 (back-pressure) or a solver upstream's 429/5xx."""
    return isinstance(e, ApiError) and (e.status in (429, 503) or e.upstream_status in RETRY_STATUSES)


class Evaluation:
    """An evaluation held by the ingress replica (an asyncio task), polled by id, persisted by EvalStore."""

    def __init__(self, eid: str, req: dict, total: int, decomposer: str, solver: str, *, status: str = "running",
                 created: Optional[float] = None, cap_usd: float = 0.0, owner: Optional[dict] = None):
        self.owner = owner  # {"id", "name"} of the key that created it (never the key); None: from before owners
        self.id, self.req, self.total = eid, req, total
        self.decomposer, self.solver = decomposer, solver
        self.items: dict[int, ItemResult] = {}
        self.status = status
        self.error: Optional[str] = None
        self.created = created or time.time()
        self.finished: Optional[float] = None
        self.report: Optional[list[str]] = None
        self.task: Optional[asyncio.Task] = None
        self.cap_usd = cap_usd

    @property
    def spent_usd(self) -> float:
        return sum(u.get("cost_usd", 0.0) for it in self.items.values() for u in it.usage.values())

    def meta(self) -> dict:
        return {"id": self.id, "request": self.req, "total": self.total, "decomposer": self.decomposer,
                "solver": self.solver, "status": self.status, "error": self.error, "created": self.created,
                "finished": self.finished, "report": self.report, "cap_usd": self.cap_usd, "owner": self.owner}

    @classmethod
    def from_meta(cls, meta: dict, items: list[dict]) -> "Evaluation":
        ev = cls(meta["id"], meta["request"], meta["total"], meta["decomposer"], meta["solver"], status=meta["status"],
                 created=meta.get("created"), cap_usd=meta.get("cap_usd", 0.0), owner=meta.get("owner"))
        ev.error, ev.finished, ev.report = meta.get("error"), meta.get("finished"), meta.get("report")
        for d in items:
            it = ItemResult.from_dict(d)
            ev.items[it.index] = it
        return ev

    def view(self, with_items: bool) -> dict:
        items = sorted(self.items.values(), key=lambda i: i.index)
        summary = summarize_items(items, self.total)
        mode = self.req.get("scoring_mode", "paper")
        out = {
            "id": self.id, "status": self.status, "done": len(items), "total": self.total,
            "progress": len(items) / self.total if self.total else 1.0,
            "decomposer": self.req.get("decomposer"), "decomposer_name": self.decomposer, "solver": self.solver,
            "dataset": self.req.get("dataset") if self.req.get("records") is None else "uploaded",
            "scoring_mode": mode, "accuracy": summary["accuracy"][mode]["accuracy"],
            "summary": summary, "spent_usd": round(self.spent_usd, 8), "max_cost_usd": self.cap_usd,
            "offline": summary["offline"], "error": self.error, "created": self.created, "finished": self.finished,
            "report": self.report, "owner": (self.owner or {}).get("name"),
        }
        if with_items:
            out["items"] = [it.to_dict() for it in items]
        return out


def _sse_chunks(completion: dict, include_usage: bool):
    """A finished chat.completion as server-sent `chat.completion.chunk` events (role, content word by word,
    finish_reason, optional usage), then `data: [DONE]`, built from the openai package's types."""
    from openai.types.chat import ChatCompletionChunk
    from openai.types.chat.chat_completion_chunk import Choice, ChoiceDelta
    from openai.types.completion_usage import CompletionUsage

    base = {"id": completion["id"], "created": completion["created"], "model": completion["model"],
            "object": "chat.completion.chunk"}

    def event(choices, **extra) -> str:
        chunk = ChatCompletionChunk(**base, choices=choices, **extra)
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

    for ch in completion["choices"]:  # choice after choice (n > 1), each ending with its finish_reason
        i, text = ch["index"], ch["message"].get("content") or ""
        yield event([Choice(index=i, delta=ChoiceDelta(role="assistant", content=""), finish_reason=None)])
        for piece in re.findall(r"\S*\s*", text):
            if piece:
                yield event([Choice(index=i, delta=ChoiceDelta(content=piece), finish_reason=None)])
        extra = {"sub_questions": ch["sub_questions"]} if "sub_questions" in ch else {}
        yield event([Choice(index=i, delta=ChoiceDelta(), finish_reason=ch["finish_reason"], **extra)])
    if include_usage:
        yield event([], usage=CompletionUsage(**completion["usage"]))
    yield "data: [DONE]\n\n"


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """Composes the decomposer and the solver through DeploymentHandles; owns the evaluations (asyncio tasks,
    persisted under `results_root` so they survive a restart of this replica)."""

    def __init__(self, decomposer, solver, config: dict, keys: Optional[list[dict]] = None):
        self.cfg = c = ServeConfig(**config)
        self.decomposer = decomposer  # DeploymentHandle or None (no distilled decomposer configured)
        self.solver = solver
        keys = keys or []
        # the exposure rule again where the app really runs: the address this cluster's proxy binds
        check_exposure(bound_hosts(c.host), len(keys), c.insecure)
        hosts = c.allowed_hosts
        if hosts is None and not keys and all(is_loopback(h) for h in bound_hosts(c.host)):
            hosts = ["localhost", "127.0.0.1", "::1"]  # keyless and local: DNS rebinding gets nothing
        set_guard(keys, c.max_request_bytes, default_quotas=c.quotas.model_dump(), max_usd_per_day=c.max_usd_per_day,
                  allowed_hosts=hosts, cors_origins=c.cors_origins, max_list_items=c.max_inline_problems)
        self.store = EvalStore(self.cfg.results_root)
        self.evals: dict[str, Evaluation] = {}
        self._reserved: dict[str, int] = {}  # admitted evaluations still loading their problems, per key id
        for eid in self.store.ids():  # what a previous replica left: finished ones served, running ones interrupted
            loaded = self.store.load(eid)
            if loaded is None:
                continue
            ev = Evaluation.from_meta(*loaded)
            if ev.status == "running":
                ev.status, ev.finished = "interrupted", time.time()
                ev.error = f"the ingress restarted; {len(ev.items)} of {ev.total} items had finished and are kept"
                self.store.save_meta(eid, ev.meta())
            self.evals[eid] = ev

    # -- composition
    async def _call(self, handle, method: str, *args) -> dict:
        from ray.serve.exceptions import BackPressureError

        try:
            res = await getattr(handle, method).remote(*args)
        except BackPressureError:
            raise ApiError(503, "overloaded: retry later", type_="server_error", code="overloaded",
                           headers={"Retry-After": str(max(1, int(self.cfg.retry_after_s + 0.999)))}) from None
        if isinstance(res, dict):  # what it cost goes to the calling key's (and the server's) $ for today
            ledger().add(current_caller()["id"], (res.get("usage") or {}).get("cost_usd") or res.get("cost_usd") or 0.0)
        return res

    def _upstream_error(self, res: dict) -> ApiError:
        """What failed, never where: the upstream URL, paths and exception text go to the log under the request id."""
        rid = current_request_id()
        stage = res.get("stage", "stage")
        log.warning("request %s: %s failed: upstream=%s status=%s %s: %s", rid, stage, res.get("upstream"),
                    res.get("status"), res.get("type"), res.get("error"))
        if res.get("upstream"):
            status = f" (HTTP {res['status']})" if res.get("status") else " (unreachable or timed out)"
            return ApiError(502, f"the solver's upstream failed during {stage}{status}; request id {rid}",
                            type_="upstream_error", code="upstream_error", upstream_status=res.get("status"))
        return ApiError(500, f"{stage} failed; request id {rid}", type_="server_error", code="internal_error")

    async def _decompose(self, kind: str, problem: str, params: Optional[dict] = None) -> Optional[Decomposition]:
        if kind == "none":
            return None
        if kind == "distilled":
            if self.decomposer is None:
                raise ApiError(422, "no distilled decomposer is served (start with --decomposer-path)", field="decomposer")
            res = await self._call(self.decomposer, "decompose", problem, params)
        else:
            res = await self._call(self.solver, "decompose", problem)
        if not res["ok"]:
            raise self._upstream_error(res)
        return Decomposition(res["questions"], res["text"], StageUsage(**res["usage"]), res.get("finish_reason", "stop"))

    async def _answer(self, problem: str, questions: list[str]) -> Answer:
        res = await self._call(self.solver, "answer", problem, questions)
        if not res["ok"]:
            raise self._upstream_error(res)
        return Answer(res["text"], StageUsage(**res["usage"]))

    def _decomposer_name(self, kind: str) -> str:
        return self.cfg.decomposer.name if kind == "distilled" else kind

    # -- endpoints
    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "decomposer": self.cfg.decomposer.name if self.decomposer else None,
                "solver": self.cfg.solver.name, "auth": bool((guard() or {}).get("keys")),
                "evaluations": sum(1 for e in self.evals.values() if e.status == "running")}

    @api.post("/v1/decompose")
    async def decompose(self, req: DecomposeRequest) -> dict:
        _problem_limit(req.problem, self.cfg.max_problem_chars, "problem")
        t0 = time.perf_counter()
        params = req.model_dump(exclude={"problem"}, exclude_none=True)
        d = await self._decompose("distilled", req.problem, params)
        return {"model": self.cfg.decomposer.name, "sub_questions": d.questions, "text": d.text,
                "finish_reason": d.finish_reason, "usage": d.usage.to_dict(), "latency_s": time.perf_counter() - t0}

    @api.post("/v1/solve")
    async def solve(self, req: SolveRequest, response: Response) -> dict:
        c = self.cfg
        _problem_limit(req.problem, c.max_problem_chars, "problem")
        _limit(req.gold_answer, c.max_answer_chars, "gold_answer", "max_answer_chars")
        if req.sub_questions is not None:
            if len(req.sub_questions) > c.max_sub_questions:
                raise ApiError(422, f"field 'sub_questions': {len(req.sub_questions)} items; the limit is "
                                    f"{c.max_sub_questions} (max_sub_questions)", field="sub_questions")
            for i, q in enumerate(req.sub_questions):
                _limit(q, c.max_sub_question_chars, f"sub_questions.{i}", "max_sub_question_chars")
        t0 = time.perf_counter()
        from subq.problems import problem_id

        if req.sub_questions is not None:
            d = Decomposition(req.sub_questions, format_subquestions(req.sub_questions), StageUsage(model="given"))
            kind = "given"
        else:
            kind = req.decomposer
            d = await self._decompose(kind, req.problem)
        a = await self._answer(req.problem, d.questions if d else [])
        parsed = parse_answers(a.text)
        out_usage = {"decompose": d.usage.to_dict() if d else None, "solve": a.usage.to_dict()}
        stages = [u for u in out_usage.values() if u]
        out_usage["total"] = {k: sum(u[k] for u in stages) for k in ("prompt_tokens", "completion_tokens", "cost_usd")}
        item = ItemResult(index=0, problem_id=problem_id(req.problem), problem=req.problem,
                          gold_answer=req.gold_answer or "", decomposer=self._decomposer_name(kind), solver=self.cfg.solver.name)
        finish_item(item, d, a)
        if item.provenance:
            response.headers["x-subq-provenance"] = item.provenance
        resp = {
            "problem_id": item.problem_id, "decomposer": item.decomposer, "solver": item.solver,
            "mode": "single_stage" if kind == "none" or item.fell_back else "two_stage",
            "fell_back_single_stage": item.fell_back, "provenance": item.provenance,
            "sub_questions": item.sub_questions, "decomposition_text": item.decomposition_text,
            "answers": parsed.answers, "answer_text": a.text, "final_answer": item.final_answer,
            "usage": out_usage,
            "latency_s": {"decompose": d.usage.latency_s if d else 0.0, "solve": a.usage.latency_s,
                          "total": time.perf_counter() - t0},
        }
        if req.gold_answer:
            from pipelines.evaluate import paper_gold
            from subq.scoring import score

            resp["scores"] = {m: score(a.text, paper_gold(req.gold_answer), m).to_dict() for m in MODES}
        return resp

    # -- evaluations
    def _registry(self) -> dict[str, str]:
        from subq.problems import NAMED_SOURCES

        return {**{n: n for n in NAMED_SOURCES}, **self.cfg.datasets}

    async def _load(self, req: EvaluationRequest) -> list:
        from subq.problems import Problem, load_problems, problem_id

        c = self.cfg
        if req.records is not None:
            if not req.records:
                raise ApiError(422, "records is empty", field="records")
            if len(req.records) > c.max_inline_problems:
                raise ApiError(422, f"field 'records': {len(req.records)} problems; the limit is "
                                    f"{c.max_inline_problems} (max_inline_problems)", field="records")
            out = []
            for i, r in enumerate(req.records[:req.limit]):
                text, gold = r.text(), r.gold()
                _limit(text, c.max_problem_chars, f"records.{i}.question")
                gold = gold if isinstance(gold, str) else f"#### {int(gold) if float(gold).is_integer() else gold}"
                _limit(gold, c.max_answer_chars, f"records.{i}.answer", "max_answer_chars")
                out.append(Problem(problem_id(text), text, gold, "uploaded", i))
            return out
        registry = self._registry()
        name = req.dataset or "gsm8k:test"
        if name not in registry:  # never a path or URI: nothing is opened for an unknown name
            raise ApiError(422, f"unknown dataset {name[:80]!r}: name one of {sorted(registry)} (the operator adds "
                                f"datasets with ServeConfig.datasets) or send `records` inline", field="dataset",
                           code="unknown_dataset")
        try:
            return await asyncio.to_thread(load_problems, registry[name], req.limit)
        except SubqError as e:
            raise ApiError(422, f"dataset {name!r} cannot be read: {type(e).__name__}", field="dataset") from None

    def _sweep(self) -> None:
        """TTL eviction of finished evaluations (memory and results root)."""
        now = time.time()
        for eid, ev in list(self.evals.items()):
            if ev.status != "running" and ev.finished and now - ev.finished > self.cfg.eval_ttl_s:
                self.evals.pop(eid, None)
                self.store.delete(eid)

    @api.post("/v1/evaluations", status_code=202)
    async def start_evaluation(self, req: EvaluationRequest) -> dict:
        c = self.cfg
        self._sweep()
        if req.solver is not None and req.solver != c.solver.name:
            raise ApiError(422, f"unknown solver {req.solver!r}; served: {c.solver.name!r}", field="solver")
        if req.decomposer == "distilled" and self.decomposer is None:
            raise ApiError(422, "no distilled decomposer is served", field="decomposer")
        if req.limit > c.max_eval_problems:
            raise ApiError(422, f"limit {req.limit} exceeds max_eval_problems={c.max_eval_problems}", field="limit")
        if req.max_cost_usd is not None and req.max_cost_usd > c.max_eval_cost_usd:
            raise ApiError(422, f"max_cost_usd {req.max_cost_usd} exceeds the server's max_eval_cost_usd="
                                f"{c.max_eval_cost_usd}", field="max_cost_usd")
        caller = current_caller()
        self._admit(caller)  # no await between the counts and the reservation: concurrent POSTs cannot all pass
        self._reserved[caller["id"]] = self._reserved.get(caller["id"], 0) + 1
        try:
            problems = await self._load(req)
            if req.exclude_few_shot:
                problems = [p for p in problems if not p.is_few_shot_example]
            eid = f"eval-{uuid.uuid4().hex[:12]}"
            name = self._decomposer_name(req.decomposer)
            ev = Evaluation(eid, req.model_dump(), len(problems), name, c.solver.name,
                            cap_usd=req.max_cost_usd or c.max_eval_cost_usd,
                            owner={"id": caller["id"], "name": caller["name"]})
            self.evals[eid] = ev  # counted as running from here on
        finally:
            self._reserved[caller["id"]] -= 1
        log.info("request %s: key %s started evaluation %s (%d items)", current_request_id(), caller["name"], eid,
                 ev.total)
        await asyncio.to_thread(self.store.save_meta, eid, ev.meta())
        pending = [new_item(i, p, name, c.solver.name) for i, p in enumerate(problems)]
        ev.task = asyncio.get_running_loop().create_task(self._run_evaluation(ev, pending))
        return {"id": eid, "status": ev.status, "total": ev.total, "url": f"/v1/evaluations/{eid}"}

    def _admit(self, caller: dict) -> None:
        """Running evaluations (server and key) and stored ones (key), counting admitted ones still loading."""
        c, q = self.cfg, caller["quotas"]
        retry = {"Retry-After": str(int(c.eval_retry_after_s))}
        mine = [e for e in self.evals.values() if (e.owner or {}).get("id") == caller["id"]]
        reserved, mine_reserved = sum(self._reserved.values()), self._reserved.get(caller["id"], 0)
        running = sum(1 for e in self.evals.values() if e.status == "running") + reserved
        if running >= c.max_running_evaluations:
            raise ApiError(429, f"{running} evaluations are running; the limit is {c.max_running_evaluations} "
                                f"(max_running_evaluations): retry later or DELETE one", type_="rate_limit_error",
                           code="too_many_evaluations", headers=retry)
        lim = q.get("max_running_evaluations")
        own = sum(1 for e in mine if e.status == "running") + mine_reserved
        if lim is not None and own >= lim:
            raise ApiError(429, f"key {caller['name']!r} has {own} evaluations running; its limit is {lim:g} (quota "
                                f"max_running_evaluations): retry later or DELETE one", type_="rate_limit_error",
                           code="too_many_evaluations", headers=retry)
        lim = q.get("max_stored_evaluations")
        if lim is not None and len(mine) + mine_reserved >= lim:
            raise ApiError(429, f"key {caller['name']!r} keeps {len(mine)} evaluations; its limit is {lim:g} (quota "
                                f"max_stored_evaluations): DELETE finished ones", type_="rate_limit_error",
                           code="too_many_stored_evaluations", headers=retry)

    async def _retrying(self, fn):
        from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

        async for attempt in AsyncRetrying(stop=stop_after_attempt(self.cfg.eval_retries + 1), reraise=True,
                                           wait=wait_random_exponential(multiplier=self.cfg.eval_retry_backoff_s, max=10),
                                           retry=retry_if_exception(_transient)):
            with attempt:
                return await fn()

    async def _run_item(self, ev: Evaluation, item: ItemResult, sem: asyncio.Semaphore) -> None:
        async with sem:
            if ev.spent_usd >= ev.cap_usd:
                ev.error = f"stopped: the cost cap ${ev.cap_usd} (max_cost_usd) was reached"
                return
            over = ledger().over_budget(current_caller(), guard())  # the owner's $ per day, the server's
            if over:
                ev.error = f"stopped: {over['message']}"
                return
            d = None
            try:
                d = await self._retrying(lambda: self._decompose(ev.req["decomposer"], item.problem))
                a = await self._retrying(lambda: self._answer(item.problem, d.questions if d else []))
            except ApiError as e:
                if d is not None:
                    item.sub_questions, item.decomposition_text = d.questions, d.text
                    item.usage["decompose"] = d.usage.to_dict()
                done = fail_item(item, "solve" if d is not None or ev.req["decomposer"] == "none" else "decompose",
                                 e.message)
            else:
                done = finish_item(item, d, a)
            ev.items[done.index] = done
            await asyncio.to_thread(self.store.save_item, ev.id, done.to_dict())

    async def _run_evaluation(self, ev: Evaluation, pending: list[ItemResult]) -> None:
        sem = asyncio.Semaphore(self.cfg.eval_concurrency)
        try:
            await asyncio.gather(*(self._run_item(ev, it, sem) for it in pending))
            items = sorted(ev.items.values(), key=lambda i: i.index)
            run = {"decomposer": ev.decomposer, "solver": ev.solver, "summary": summarize_items(items, ev.total),
                   "items": items}
            written = await asyncio.to_thread(write_report, self.store.report_dir(ev.id), [run],
                                              {"evaluation": ev.req, "id": ev.id})
            ev.report = sorted(written)
            ev.status = "stopped" if ev.error else "completed"
        except asyncio.CancelledError:
            ev.status, ev.error = "cancelled", ev.error or "cancelled by DELETE"
        except Exception as e:  # noqa: BLE001 - the evaluation fails, the replica does not
            rid = current_request_id()
            log.exception("evaluation %s (request %s) failed", ev.id, rid)
            ev.status, ev.error = "failed", f"{type(e).__name__} (details in the server log, request id {rid})"
        finally:
            ev.finished = time.time()
            await asyncio.to_thread(self.store.save_meta, ev.id, ev.meta())

    @staticmethod
    def _visible(ev: Evaluation, caller: dict) -> bool:
        return bool(caller.get("admin")) or (ev.owner or {}).get("id") == caller["id"]

    def _get(self, eid: str) -> Evaluation:
        """The caller's own evaluation (any, for an admin key); another key's is 404 like an unknown id."""
        ev = self.evals.get(eid)
        if ev is None or not self._visible(ev, current_caller()):
            raise ApiError(404, f"no evaluation with id {eid[:40]!r}", field="id", code="not_found")
        return ev

    @api.get("/v1/evaluations")
    async def list_evaluations(self) -> dict:
        self._sweep()
        caller = current_caller()
        return {"object": "list", "data": [{"id": e.id, "status": e.status, "done": len(e.items), "total": e.total,
                                            "decomposer": e.decomposer, "created": e.created,
                                            "owner": (e.owner or {}).get("name")}
                                           for e in sorted(self.evals.values(), key=lambda e: e.created)
                                           if self._visible(e, caller)]}

    @api.get("/v1/usage")
    async def usage(self) -> dict:
        """The calling key's quotas, $ spent today (UTC) and evaluations; an admin key also sees every key's."""
        caller = current_caller()

        def one(kid: str, name: str, quotas: dict) -> dict:
            own = [e for e in self.evals.values() if (e.owner or {}).get("id") == kid]
            return {"key": name, "quotas": quotas, "spent_usd_today": round(ledger().spent(kid), 8),
                    "running_evaluations": sum(1 for e in own if e.status == "running"), "stored_evaluations": len(own)}

        out = {"object": "usage", **one(caller["id"], caller["name"], caller["quotas"]),
               "server_spent_usd_today": round(ledger().spent("*"), 8), "max_usd_per_day": self.cfg.max_usd_per_day}
        if caller.get("admin"):
            g = guard() or {}
            out["keys"] = [one(k["id"], k["name"], k.get("quotas") or {}) for k in g.get("keys", [])]
        return out

    @api.get("/v1/evaluations/{eid}")
    async def get_evaluation(self, eid: str, items: bool = Query(False, description="Include per-item results.")) -> dict:
        return self._get(eid).view(items)

    @api.delete("/v1/evaluations/{eid}")
    async def delete_evaluation(self, eid: str) -> dict:
        """A running evaluation is cancelled (its in-flight calls too) and kept as `cancelled`; a finished one is
        deleted with its files."""
        ev = self._get(eid)
        if ev.status == "running" and ev.task is not None:
            ev.error = "cancelled by DELETE"
            ev.task.cancel()
            try:
                await asyncio.wait_for(asyncio.shield(ev.task), timeout=10)
            except (asyncio.CancelledError, asyncio.TimeoutError):
                pass
            return {"id": eid, "status": ev.status, "done": len(ev.items), "total": ev.total, "deleted": False}
        self.evals.pop(eid, None)
        await asyncio.to_thread(self.store.delete, eid)
        return {"id": eid, "status": ev.status, "deleted": True}

    @api.get("/v1/evaluations/{eid}/paper_raw")
    async def get_paper_raw(self, eid: str):
        """The evaluation's outputs in the release's raw jsonl format (score it with `subq score`)."""
        from subq.schema import dumps_paper

        ev = self._get(eid)
        return PlainTextResponse(dumps_paper(items_to_rows(list(ev.items.values())), "paper_raw"),
                                 media_type="application/x-ndjson")

    @api.get("/v1/models")
    async def models(self) -> dict:
        data = []
        if self.decomposer is not None:
            data.append({"id": self.cfg.decomposer.name, "object": "model", "created": 0, "owned_by": "subq",
                         "role": "decomposer"})
        if self.cfg.solver.backend == "local":
            data.append({"id": self.cfg.solver.name, "object": "model", "created": 0, "owned_by": "subq", "role": "solver"})
        return {"object": "list", "data": data}

    @api.post("/v1/chat/completions")
    async def chat(self, req: ChatRequest):
        to_solver = self.cfg.solver.backend == "local" and req.model == self.cfg.solver.name and not (
            self.decomposer is not None and req.model == self.cfg.decomposer.name)
        refused = chat_refusal(req, solver=to_solver)  # before any work, streamed or not
        if refused is not None:
            raise refused
        for i, m in enumerate(req.messages):
            if isinstance(m.content, str):
                _problem_limit(m.content, self.cfg.max_problem_chars * 4, f"messages.{i}.content")
            elif m.content is not None:
                _problem_limit(json.dumps(m.content), self.cfg.max_problem_chars * 4, f"messages.{i}.content")
        body = req.model_dump()
        if self.decomposer is not None and req.model == self.cfg.decomposer.name:
            res = await self._call(self.decomposer, "chat", body)
        elif self.cfg.solver.backend == "local" and req.model == self.cfg.solver.name:
            res = await self._call(self.solver, "chat", body)
        else:
            served = [m["id"] for m in (await self.models())["data"]]
            raise ApiError(404, f"model {req.model!r} is not served here; served: {served}", field="model",
                           code="model_not_found")
        if not res["ok"]:
            raise self._upstream_error(res)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse_chunks(res["response"], usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return res["response"]


# ---------------------------------------------------------------- building and running


def api_key_entries(cfg: ServeConfig) -> list[dict]:
    """The configured keys as the Ingress gets them (digest, id, name, admin, quotas; never the key), after the
    exposure rule: a non-loopback bind needs keys or insecure, checked on the config's host and on the address the
    running Serve proxy really binds (`serve deploy`, `serve run`, KubeRay build the app where that proxy runs)."""
    entries = load_key_entries(cfg.api_keys_env, cfg.api_keys_file)
    for e in entries:
        if e.quotas:
            Quotas(**e.quotas)  # the key file's quotas: the same fields and bounds as ServeConfig.quotas
    check_exposure(bound_hosts(cfg.host), len(entries), cfg.insecure)
    return [e.public() for e in entries]


def api_key_digests(cfg: ServeConfig) -> list[str]:
    """SHA-256 digests of the configured API keys, after the exposure rule."""
    return [e["digest"] for e in api_key_entries(cfg)]


def build_app(config: ServeConfig):
    """The Serve application (Ingress bound to the Decomposer and Solver deployments) for `config`. API keys are
    read here (env/file) and only their digests reach the Ingress; the results root is made absolute here."""
    cfg = config if isinstance(config, ServeConfig) else ServeConfig(**config)
    cfg.solver.price()  # an unpriced solver model is a ConfigError now, not a wrong $ later
    keys = api_key_entries(cfg)
    if "://" not in cfg.results_root:
        cfg = cfg.model_copy(update={"results_root": os.path.abspath(os.path.expanduser(cfg.results_root))})
    backpressure = {"status_code": 503, "retry_after_s": cfg.retry_after_s}

    def autoscaling(lo: int, hi: int) -> dict:
        return {"min_replicas": lo, "initial_replicas": max(1, lo), "max_replicas": hi,
                "target_ongoing_requests": cfg.target_ongoing_requests}

    decomposer = None
    if cfg.decomposer.path:
        decomposer = DecomposerDeployment.options(
            max_ongoing_requests=cfg.decomposer_max_ongoing_requests, max_queued_requests=cfg.max_queued_requests,
            autoscaling_config=autoscaling(cfg.decomposer_min_replicas, cfg.decomposer_max_replicas),
            ray_actor_options={"num_cpus": cfg.decomposer_num_cpus, "num_gpus": cfg.decomposer_num_gpus},
        ).bind(cfg.decomposer.model_dump(), cfg.max_batch_size, cfg.batch_wait_timeout_s,
               max(1, int(cfg.decomposer_num_cpus)), cfg.decode_temperatures, cfg.decode_betas)
    solver = SolverDeployment.options(
        max_ongoing_requests=cfg.solver_max_ongoing_requests, max_queued_requests=cfg.max_queued_requests,
        autoscaling_config=autoscaling(cfg.solver_min_replicas, cfg.solver_max_replicas),
        ray_actor_options={"num_cpus": 0},
    ).bind(cfg.solver.model_dump())
    return Ingress.options(
        num_replicas=1,  # evaluations live in this replica's memory
        max_ongoing_requests=cfg.ingress_max_ongoing_requests, max_queued_requests=cfg.max_queued_requests,
        backpressure_config=backpressure, ray_actor_options={"num_cpus": 0},
    ).bind(decomposer, solver, cfg.model_dump(), keys)


def app_builder(args: dict):
    """Entry for `serve deploy` / `serve run pipelines.serve:app_builder`: `args` are ServeConfig fields
    (nested `decomposer.*` / `solver.*` also accepted as dotted keys)."""
    nested: dict[str, Any] = {}
    for k, v in dict(args or {}).items():
        if "." in k:
            outer, inner = k.split(".", 1)
            nested.setdefault(outer, {})[inner] = v
        else:
            nested[k] = v
    from subq.config import load_config

    return build_app(load_config(ServeConfig, None, nested))


def _start_proxy(config: ServeConfig, ray_init: Optional[dict]) -> None:
    """Start Ray (if needed) and Serve's HTTP proxy on config.host:port."""
    import ray

    if not ray.is_initialized():
        from cluster.connect import init_ray
        init_ray(**(ray_init or {"include_dashboard": False}))
    serve.start(http_options={"host": config.host, "port": config.port})


def start_serve(config: ServeConfig, *, ray_init: Optional[dict] = None) -> str:
    """Start Ray (if needed) and Serve on config.host:port, deploy the app, wait until healthy; return the base URL
    (`http://host:port` + route prefix, no trailing slash)."""
    _start_proxy(config, ray_init)
    serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix, blocking=False)
    base = f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}"
    wait_healthy(base)
    return base


def start_serve_many(configs: list[ServeConfig], *, ray_init: Optional[dict] = None) -> list[str]:
    """Deploy several applications together (one HTTP proxy: the first config's host and port; each its own
    app_name and route_prefix), their replicas starting at the same time; wait until every one is healthy and
    return their base URLs in order."""
    from ray.serve.api import RunTarget

    _start_proxy(configs[0], ray_init)
    serve.run_many([RunTarget(target=build_app(c), name=c.app_name, route_prefix=c.route_prefix)
                    for c in configs], wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    bases = [f"http://{configs[0].host}:{configs[0].port}{c.route_prefix.rstrip('/')}" for c in configs]
    for base in bases:
        wait_healthy(base)
    return bases


def wait_healthy(base: str, timeout_s: float = 120) -> None:
    """Wait until the application at `base` answers GET /healthz with 200."""
    import httpx

    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(base + "/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise SubqError(f"the Serve app did not become healthy at {base}/healthz within {timeout_s:.0f} s")
        time.sleep(0.5)


def stop_serve(shutdown_ray: bool = True) -> None:
    import ray

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            if shutdown_ray:
                ray.shutdown()
