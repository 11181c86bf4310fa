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
  `GET /v1/models` for the locally served models. Errors are `{"error": {"type", "message", "field"?, "upstream"?}}`.

Python API: `ServeConfig`, `build_app(config) -> Application`, `app_builder(args)` (for `serve deploy`),
`start_serve(config) -> base_url`, `stop_serve()`.
"""



import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from typing import Any, Literal, Optional

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve

from pipelines.evaluate import (
    Answer, Decomposition, DecomposerSettings, ItemResult, LocalDecomposer, Solver, SolverSettings, StageUsage,
    UpstreamError, fail_item, finish_item, items_to_rows, new_item, summarize_items, write_report,
)
from subq.errors import SubqError
from subq.parsers import format_subquestions, parse_answers
from subq.scoring import MODES

# ---------------------------------------------------------------- config


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
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="@serve.batch wait for a batch to fill.")
    decomposer_max_ongoing_requests: int = Field(16, ge=1, description="Per-replica concurrent requests (>= max_batch_size).")
    decomposer_min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound.")
    decomposer_max_replicas: int = Field(2, ge=1, description="Autoscaling upper bound.")
    decomposer_num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per decomposer replica.")
    decomposer_num_gpus: float = Field(0.0, ge=0, description="GPUs per decomposer replica; > 0 puts the model on cuda (bf16 where supported).")
    solver_max_ongoing_requests: int = Field(64, ge=1, description="Solver calls in flight per replica (they wait on I/O).")
    solver_min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound.")
    solver_max_replicas: int = Field(2, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(4.0, gt=0, description="Autoscaling target of in-flight requests per replica.")
    ingress_max_ongoing_requests: int = Field(64, ge=1, description="Concurrent HTTP requests per ingress replica.")
    max_queued_requests: int = Field(64, ge=1, description="Requests queued beyond that before HTTP 503 + Retry-After.")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After seconds sent with 503 (overload).")
    max_request_bytes: int = Field(1_000_000, ge=1024, description="Bodies larger than this get HTTP 413.")
    max_problem_chars: int = Field(8000, ge=1, description="Longer problems / messages get HTTP 422 naming the field.")
    max_eval_problems: int = Field(2000, ge=1, description="Largest `limit` an evaluation may ask for.")
    eval_concurrency: int = Field(8, ge=1, description="Items in flight per running evaluation.")

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if self.decomposer_max_ongoing_requests < self.max_batch_size:
            raise ValueError("decomposer_max_ongoing_requests must be >= max_batch_size, or batches never fill")
        if self.decomposer_max_replicas < max(1, self.decomposer_min_replicas):
            raise ValueError("decomposer_max_replicas must be >= decomposer_min_replicas")
        if self.solver_max_replicas < max(1, self.solver_min_replicas):
            raise ValueError("solver_max_replicas must be >= solver_min_replicas")
        # the decomposer's device follows the GPUs Ray reserves for it: never an idle reserved GPU, nor a GPU used
        # that Ray did not reserve
        cuda = self.decomposer.device.startswith("cuda")
        if self.decomposer_num_gpus > 0 and not cuda:
            if "device" in self.decomposer.model_fields_set:
                raise ValueError("decomposer.device is cpu but decomposer_num_gpus > 0 (a reserved GPU left idle)")
            self.decomposer.device = "cuda"
        elif cuda and self.decomposer_num_gpus == 0:
            raise ValueError("decomposer.device is cuda but decomposer_num_gpus is 0: Ray reserves no GPU for it")
        return self


# ---------------------------------------------------------------- deployments


def _chat_response(model: str, content: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


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


@serve.deployment(name="Decomposer")
class DecomposerDeployment:
    """The distilled decomposer, batched. Methods return plain dicts; errors come back as {"ok": False, ...}
    so a bad request never takes the replica down."""

    def __init__(self, settings: dict, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01):
        import torch

        torch.set_num_threads(1)
        self.settings = DecomposerSettings(**settings)
        self.local = LocalDecomposer(self.settings)
        if self.settings.device.startswith("cuda") and torch.cuda.is_bf16_supported():
            self.local.model.model.to(torch.bfloat16)  # the LM in bf16 (ILQL heads cast its states to their dtype)
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: list[int] = []

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, requests: list[tuple]) -> list[dict]:
        self.batch_sizes.append(len(requests))
        # one generate call per distinct decoding setting in the batch
        groups: dict[str, list[int]] = {}
        for i, (_, params) in enumerate(requests):
            groups.setdefault(json.dumps(params, sort_keys=True), []).append(i)
        results: list[Optional[dict]] = [None] * len(requests)
        for key, idx in groups.items():
            params = json.loads(key)
            try:
                decs = await asyncio.to_thread(self.local.decompose_batch, [requests[i][0] for i in idx], **params)
                for i, d in zip(idx, decs):
                    results[i] = {"ok": True, "questions": d.questions, "text": d.text, "usage": d.usage.to_dict()}
            except Exception as e:  # noqa: BLE001 - reported per request
                for i in idx:
                    results[i] = _err("decompose", e)
        return results

    async def decompose(self, problem: str, params: Optional[dict] = None) -> dict:
        return await self._batched((problem, {k: v for k, v in (params or {}).items() if v is not None}))

    async def chat(self, body: dict) -> dict:
        params = {"max_new_tokens": body.get("max_tokens") or body.get("max_completion_tokens")}
        temp = body.get("temperature")
        if temp is not None:
            params.update(do_sample=temp > 0, temperature=temp if temp > 0 else None)
        res = await self.decompose(problem_from_messages(body["messages"]), params)
        if not res["ok"]:
            return res
        u = res["usage"]
        return {"ok": True, "response": _chat_response(self.settings.name, format_subquestions(res["questions"]),
                                                      u["prompt_tokens"], u["completion_tokens"])}

    def stats(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes)}


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
            text, u = await self.solver.chat(body["messages"], temperature=body.get("temperature"),
                                             max_tokens=body.get("max_tokens"))
            return {"ok": True, "response": _chat_response(self.settings.name, text, u.prompt_tokens, u.completion_tokens)}
        except Exception as e:  # noqa: BLE001
            return _err("solve", e)


# ---------------------------------------------------------------- HTTP API


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, field: Optional[str] = None, type_: str = "invalid_request_error",
                 upstream: Optional[str] = None, headers: Optional[dict] = None):
        self.status, self.message, self.field, self.type = status, message, field, type_
        self.upstream, self.headers = upstream, headers or {}


def _error_body(status: int, message: str, field: Optional[str] = None, type_: str = "invalid_request_error",
                upstream: Optional[str] = None) -> dict:
    err: dict[str, Any] = {"type": type_, "message": message, "code": status}
    if field:
        err["field"] = field
    if upstream:
        err["upstream"] = upstream
    return {"error": err}


api = FastAPI(title="subq", description="Distilled decomposer + solver, on Ray Serve.")
api.state.max_request_bytes = 1_000_000


@api.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError):
    return JSONResponse(_error_body(e.status, e.message, e.field, e.type, e.upstream), status_code=e.status, headers=e.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError):
    errs = e.errors()
    first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    field = ".".join(loc) or "body"
    if first.get("type") == "json_invalid":
        msg = f"malformed JSON: {first.get('msg')} (at {first.get('ctx', {}).get('error', '')})".strip()
        return JSONResponse(_error_body(400, msg, "body"), status_code=400)
    msg = first.get("msg", "invalid value")
    return JSONResponse(_error_body(422, f"field '{field}': {msg}", field), status_code=422)


@api.middleware("http")
async def _limit_body(request: Request, call_next):
    limit = int(os.environ.get("SUBQ_MAX_REQUEST_BYTES", "1000000"))  # set by Ingress.__init__ in this replica
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        return JSONResponse(_error_body(413, f"request body is {length} bytes; the limit is {limit} (max_request_bytes)", "body"),
                            status_code=413)
    return await call_next(request)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _nonempty(v: str, field: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{field} must be a non-empty string")
    return v


class DecomposeRequest(_Strict):
    problem: str = Field(..., description="The math word problem.")
    beta: Optional[float] = Field(None, description="ILQL guidance weight (default: the server's).")
    do_sample: Optional[bool] = Field(None, description="Sample instead of greedy.")
    temperature: Optional[float] = Field(None, gt=0, description="Sampling temperature.")
    max_new_tokens: Optional[int] = Field(None, gt=0, le=4096, description="Max generated tokens.")

    _p = field_validator("problem")(lambda v: _nonempty(v, "problem"))


Decomposer = Literal["distilled", "teacher", "none"]


class SolveRequest(_Strict):
    problem: str = Field(..., description="The math word problem.")
    decomposer: Decomposer = Field("distilled", description="distilled (our model), teacher (the solver endpoint's QG), none (single-stage).")
    sub_questions: Optional[list[str]] = Field(None, description="Skip decomposition and use these sub-questions.")
    gold_answer: Optional[str] = Field(None, description="If given, the reply is scored in every mode.")

    _p = field_validator("problem")(lambda v: _nonempty(v, "problem"))


class EvaluationRequest(_Strict):
    dataset: Optional[str] = Field("gsm8k:test", description="Split name (gsm8k:test) or a .jsonl/.json/.parquet path or URI readable by the server.")
    records: Optional[list[dict]] = Field(None, description="Uploaded problems instead of `dataset`: [{question, answer}, ...].")
    decomposer: Decomposer = Field("distilled", description="distilled | teacher | none.")
    solver: Optional[str] = Field(None, description="Solver model id (must be the served solver's name; default: it).")
    scoring_mode: Literal["paper", "strict", "flexible"] = Field("paper", description="Headline mode; all modes are reported.")
    limit: int = Field(20, gt=0, description="Evaluate the first N problems.")
    out: Optional[str] = Field(None, description="Also write the report directory here (server-side path or URI).")


class ChatMessage(BaseModel):
    role: str
    content: Any = None


class ChatRequest(BaseModel):
    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    max_tokens: Optional[int] = Field(None, gt=0, le=4096)
    max_completion_tokens: Optional[int] = Field(None, gt=0, le=4096)
    stream: Optional[bool] = False
    n: Optional[int] = Field(1, ge=1)


def _problem_limit(text: str, limit: int, field: str) -> None:
    if len(text) > limit:
        raise ApiError(422, f"field '{field}': {len(text)} characters; the limit is {limit} (max_problem_chars)", field=field)


class Evaluation:
    """A running evaluation: an asyncio task in the ingress replica, polled by id."""

    def __init__(self, eid: str, req: EvaluationRequest, items: list[ItemResult]):
        self.id, self.req, self.pending = eid, req, items
        self.total = len(items)
        self.items: list[ItemResult] = []
        self.status = "running"
        self.error: Optional[str] = None
        self.created = time.time()
        self.finished: Optional[float] = None
        self.report: Optional[dict] = None
        self.task: Optional[asyncio.Task] = None

    def view(self, with_items: bool) -> dict:
        summary = summarize_items(self.items, self.total)
        out = {
            "id": self.id, "status": self.status, "done": len(self.items), "total": self.total,
            "progress": len(self.items) / self.total if self.total else 1.0,
            "decomposer": self.req.decomposer, "solver": self.items[0].solver if self.items else self.req.solver,
            "dataset": self.req.dataset if self.req.records is None else "uploaded", "scoring_mode": self.req.scoring_mode,
            "accuracy": summary["accuracy"][self.req.scoring_mode]["accuracy"],
            "summary": summary, "error": self.error, "created": self.created, "finished": self.finished,
            "report": self.report,
        }
        if with_items:
            out["items"] = [it.to_dict() for it in sorted(self.items, key=lambda i: i.index)]
        return out


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """Composes the decomposer and the solver through DeploymentHandles; owns the evaluations (asyncio tasks)."""

    def __init__(self, decomposer, solver, config: dict):
        self.cfg = ServeConfig(**config)
        self.decomposer = decomposer  # DeploymentHandle or None (no distilled decomposer configured)
        self.solver = solver
        self.evals: dict[str, Evaluation] = {}
        os.environ["SUBQ_MAX_REQUEST_BYTES"] = str(self.cfg.max_request_bytes)

    # -- composition
    async def _call(self, handle, method: str, *args) -> dict:
        from ray.serve.exceptions import BackPressureError

        try:
            return await getattr(handle, method).remote(*args)
        except BackPressureError as e:
            raise ApiError(503, f"overloaded: {e}", type_="overloaded",
                           headers={"Retry-After": str(max(1, int(self.cfg.retry_after_s + 0.999)))}) from None

    def _upstream_error(self, res: dict) -> ApiError:
        if res.get("upstream"):
            return ApiError(502, f"solver upstream {res['upstream']} failed: {res['error']}", type_="upstream_error",
                            upstream=res["upstream"])
        return ApiError(500, f"{res.get('stage', 'stage')} failed: {res['error']}", type_="internal_error")

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
        return Decomposition(res["questions"], res["text"], StageUsage(**res["usage"]))

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
                "solver": self.cfg.solver.name, "solver_upstream": self.cfg.solver.upstream(),
                "evaluations": len(self.evals)}

    @api.post("/v1/decompose")
    async def decompose(self, req: DecomposeRequest) -> dict:
        _problem_limit(req.problem, self.cfg.max_problem_chars, "problem")
        t0 = time.perf_counter()
        params = req.model_dump(exclude={"problem"}, exclude_none=True)
        d = await self._decompose("distilled", req.problem, params)
        return {"model": self.cfg.decomposer.name, "sub_questions": d.questions, "text": d.text,
                "usage": d.usage.to_dict(), "latency_s": time.perf_counter() - t0}

    @api.post("/v1/solve")
    async def solve(self, req: SolveRequest) -> dict:
        _problem_limit(req.problem, self.cfg.max_problem_chars, "problem")
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
        resp = {
            "problem_id": item.problem_id, "decomposer": item.decomposer, "solver": item.solver,
            "mode": "single_stage" if kind == "none" else "two_stage",
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

    @api.post("/v1/evaluations", status_code=202)
    async def start_evaluation(self, req: EvaluationRequest) -> dict:
        from subq.problems import load_problems

        if req.solver is not None and req.solver != self.cfg.solver.name:
            raise ApiError(422, f"unknown solver {req.solver!r}; served: {self.cfg.solver.name!r}", field="solver")
        if req.decomposer == "distilled" and self.decomposer is None:
            raise ApiError(422, "no distilled decomposer is served", field="decomposer")
        if req.limit > self.cfg.max_eval_problems:
            raise ApiError(422, f"limit {req.limit} exceeds max_eval_problems={self.cfg.max_eval_problems}", field="limit")
        try:
            if req.records is not None:
                if not req.records:
                    raise ApiError(422, "records is empty", field="records")
                field = "records"
                with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
                    f.write("".join(json.dumps(r) + "\n" for r in req.records))
                try:
                    problems = await asyncio.to_thread(load_problems, f.name, req.limit)
                finally:
                    os.unlink(f.name)
                field = "records"
            else:
                field = "dataset"
                problems = await asyncio.to_thread(load_problems, req.dataset, req.limit)
        except SubqError as e:
            msg = str(e).replace(f.name, "records") if req.records is not None else str(e)
            raise ApiError(422, msg, field=field if not e.field else f"{field}.{e.field}") from None
        eid = f"eval-{uuid.uuid4().hex[:12]}"
        items = [new_item(i, p, self._decomposer_name(req.decomposer), self.cfg.solver.name) for i, p in enumerate(problems)]
        ev = Evaluation(eid, req, items)
        self.evals[eid] = ev
        ev.task = asyncio.get_running_loop().create_task(self._run_evaluation(ev))
        return {"id": eid, "status": ev.status, "total": ev.total, "url": f"/v1/evaluations/{eid}"}

    async def _run_item(self, ev: Evaluation, item: ItemResult, sem: asyncio.Semaphore) -> None:
        async with sem:
            try:
                d = await self._decompose(ev.req.decomposer, item.problem)
            except ApiError as e:
                ev.items.append(fail_item(item, "decompose", e.message))
                return
            try:
                a = await self._answer(item.problem, d.questions if d else [])
            except ApiError as e:
                if d is not None:
                    item.sub_questions, item.decomposition_text = d.questions, d.text
                    item.usage["decompose"] = d.usage.to_dict()
                item.error, item.error_stage = e.message, "solve"
                ev.items.append(finish_item(item, None, None))
                return
            ev.items.append(finish_item(item, d, a))

    async def _run_evaluation(self, ev: Evaluation) -> None:
        sem = asyncio.Semaphore(self.cfg.eval_concurrency)
        try:
            await asyncio.gather(*(self._run_item(ev, it, sem) for it in ev.pending))
            if ev.req.out:
                items = sorted(ev.items, key=lambda i: i.index)
                run = {"decomposer": items[0].decomposer if items else ev.req.decomposer,
                       "solver": self.cfg.solver.name, "summary": summarize_items(items), "items": items}
                ev.report = await asyncio.to_thread(write_report, ev.req.out, [run], {"evaluation": ev.req.model_dump()})
            ev.status = "completed"
        except Exception as e:  # noqa: BLE001 - the evaluation fails, the replica does not
            ev.status, ev.error = "failed", f"{type(e).__name__}: {e}"
        finally:
            ev.finished = time.time()

    def _get(self, eid: str) -> Evaluation:
        if eid not in self.evals:
            raise ApiError(404, f"no evaluation with id {eid!r}", field="id", type_="not_found")
        return self.evals[eid]

    @api.get("/v1/evaluations/{eid}")
    async def get_evaluation(self, eid: str, items: bool = Query(False, description="Include per-item results.")) -> dict:
        return self._get(eid).view(items)

    @api.get("/v1/evaluations/{eid}/paper_raw")
    async def get_paper_raw(self, eid: str):
        """The evaluation's outputs in the release's raw jsonl format (score it with `subq score`)."""
        from subq.schema import dumps_paper

        ev = self._get(eid)
        return PlainTextResponse(dumps_paper(items_to_rows(ev.items), "paper_raw"), media_type="application/x-ndjson")

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
    async def chat(self, req: ChatRequest) -> dict:
        if req.stream:
            raise ApiError(400, "streaming is not supported", field="stream")
        if req.n and req.n > 1:
            raise ApiError(400, "only n=1 is supported", field="n")
        for i, m in enumerate(req.messages):
            if isinstance(m.content, str):
                _problem_limit(m.content, self.cfg.max_problem_chars * 4, f"messages.{i}.content")
        body = req.model_dump()
        if self.decomposer is not None and req.model == self.cfg.decomposer.name:
            res = await self._call(self.decomposer, "chat", body)
        elif self.cfg.solver.backend == "local" and req.model == self.cfg.solver.name:
            res = await self._call(self.solver, "chat", body)
        else:
            served = [m["id"] for m in (await self.models())["data"]]
            raise ApiError(404, f"model {req.model!r} is not served here; served: {served}", field="model",
                           type_="not_found")
        if not res["ok"]:
            raise self._upstream_error(res)
        return res["response"]


# ---------------------------------------------------------------- building and running


def build_app(config: ServeConfig):
    """The Serve application (Ingress bound to the Decomposer and Solver deployments) for `config`."""
    cfg = config if isinstance(config, ServeConfig) else ServeConfig(**config)
    cfg.solver.price()  # an unpriced solver model is a ConfigError now, not a wrong $ later
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
        ).bind(cfg.decomposer.model_dump(), cfg.max_batch_size, cfg.batch_wait_timeout_s)
    solver = SolverDeployment.options(
        max_ongoing_requests=cfg.solver_max_ongoing_requests, max_queued_requests=cfg.max_queued_requests,
        autoscaling_config=autoscaling(cfg.solver_min_replicas, cfg.solver_max_replicas),
        ray_actor_options={"num_cpus": 0},
    ).bind(cfg.solver.model_dump())
    return Ingress.options(
        num_replicas=1,  # evaluations live in this replica's memory
        max_ongoing_requests=cfg.ingress_max_ongoing_requests, max_queued_requests=cfg.max_queued_requests,
        backpressure_config=backpressure, ray_actor_options={"num_cpus": 0},
    ).bind(decomposer, solver, cfg.model_dump())


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


def start_serve(config: ServeConfig, *, ray_init: Optional[dict] = None, wait: bool = True) -> str:
    """Start Ray (if needed) and Serve on config.host:port, deploy the app, wait until healthy; return the base URL
    (`http://host:port` + route prefix, no trailing slash)."""
    import ray

    if not ray.is_initialized():
        ray.init(**(ray_init or {"include_dashboard": False}))
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix, blocking=False)
    base = f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}"
    if wait:
        import httpx

        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SubqError(f"the Serve app did not become healthy at {base}/healthz within 120 s")
            time.sleep(0.5)
    return base


def stop_serve(shutdown_ray: bool = True) -> None:
    import ray

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            if shutdown_ray:
                ray.shutdown()


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m pipelines.serve ...` (what `subq submit serve` runs on the cluster): the same flags as `subq serve`."""
    from subq.cli import main as cli_main

    cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
