"""The `Ingress` deployment: the FastAPI routes over the Decomposer and Solver, evaluations and keys."""

import asyncio
import json
import time
import uuid
from typing import Optional

from fastapi import Query, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from ray import serve

from pipelines.eval_store import EvalStore
from subq.evaluation import (
    Answer, Decomposition, ItemResult, StageUsage, fail_item, finish_item, items_to_rows, new_item, summarize_items,
)
from subq.report import write_report
from pipelines.serve.api import (
    ApiError,
    ChatRequest,
    DecomposeRequest,
    EvaluationRequest,
    SolveRequest,
    _limit,
    _problem_limit,
    _sse_chunks,
    api,
    chat_refusal,
    log,
)
from pipelines.serve.config import ServeConfig
from pipelines.serve.evaluations import Evaluation, _transient
from pipelines.serve_auth import (
    bound_hosts,
    check_exposure,
    current_caller,
    current_request_id,
    guard,
    is_loopback,
    ledger,
    set_guard,
)
from subq.errors import SubqError
from subq.parsers import format_subquestions, parse_answers
from subq.scoring import MODES


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
        ledger().persist(self.cfg.results_root)  # the day's $ per key, as a previous replica left it
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
            call = getattr(handle, method).remote(*args)
            try:
                res = await call
            except asyncio.CancelledError:  # our caller left: a client disconnect (Serve cancels the call itself) or a
                # DELETEd evaluation's task (Serve does not know of it): the deployment stops working on it
                call.cancel()
                raise
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
            from subq.evaluation import paper_gold
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
