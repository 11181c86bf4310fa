"""A real local OpenAI-compatible teacher server (FastAPI + uvicorn) for offline runs, tests and benchmarks.

    subq teacher-server --port 8300 --rpm 600 --tpm 200000 --latency-ms 200 \\
        --fail-rate 0.05 --malformed-rate 0.02 --timeout-rate 0.01
    python -m pipelines.teacher_server --port 8300          # the same, as a module
    # on a cluster, as a long-running job next to the generation job:
    ray job submit --working-dir . -- python -m pipelines.teacher_server --host 0.0.0.0 --port 8300

Endpoints: `POST /v1/chat/completions` (non-streaming), `GET /v1/models`, `GET /v1/stats`
(`?keys=false` drops the per-key map), `POST /v1/stats/reset`, `GET /healthz`, `GET /v1/prompts` (with
`record_prompts`: each answered call's messages and reply, for tests), and the provider's bill,
`GET /v1/organization/usage/completions` (below).

The bill: every reply the server returned with status 200 is billed, as a provider bills it: good replies,
malformed ones (a reply in no expected format, and a truncated body: the tokens were generated and sent) and
Batch replies (each answered request line of a batch, marked `batch: true`). Errors (429, 4xx, 5xx, the 504 of a
hang) are not billed. `GET /v1/organization/usage/completions?start_time=...` answers in the shape of OpenAI's
Usage API: `{"object": "page", "data": [{"object": "bucket", "start_time", "end_time", "results": [{"object":
"organization.usage.completions.result", "input_tokens", "output_tokens", "input_cached_tokens",
"num_model_requests", "model", "batch", ...}]}], "has_more", "next_page"}` with `bucket_width` (1m, 1h, 1d:
default), `end_time`, `group_by` (model, batch), `models`, `batch` and `limit`. `TeacherServer.bill()` sums it
(`{"input_tokens", "output_tokens", "requests", "online": {...}, "batch": {...}}`) so tests reconcile a run's
summary.json with what the provider would invoice. `/v1/stats/reset` does not clear the bill (an invoice is not
reset).

What it answers (it reads the prompt with `subq.prompts.parse_prompt`):
- **replay**: for problems in the released GSM8K-AI-SubQ test file (`subq/data/gsm8k-ai-subq/qg_test_data_raw.jsonl`)
  the QG reply is the released ChatGPT sub-question set number `sample_index` (header `x-subq-sample-index`,
  else a random one) and the QA reply for a released set is the released ChatGPT answer to it.
- **synthetic** (labelled): feedback (the release's test file has none), sets beyond the recorded ones,
  QA for sub-questions never recorded, and every problem not in the recordings (e.g. `gsm8k:train`) are built
  from the GSM8K gold worked solution (`subq/data/gsm8k/*.jsonl`): one sub-question per solution step, answers
  from the steps, `Final answer: N`. Unknown problems get a generic two-question reply.
Every reply says which: JSON field `subq_provenance` ("replay" | "synthetic") and header `x-subq-provenance`;
`system_fingerprint` is `subq-replay` / `subq-synthetic`. `usage` counts tokens (~4 characters per token).

Like a real provider: RPM/TPM token buckets answer 429 with `Retry-After`, `retry-after-ms` and
`x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers; an optional API key (401 otherwise);
an optional model list (404 otherwise); latency ~ N(latency, jitter); injected faults: 5xx (`--fail-rate`),
hangs answered 504 after `--timeout-hang-s` (`--timeout-rate`) and malformed 200 replies (`--malformed-rate`:
a share `malformed_body_share` (default half) a truncated JSON body, the rest a reply in no expected format).

Counting: `/v1/stats` gives total requests, per-status counts, malformed/timeouts, in-flight (now and max) and
`completed_by_key`: for each request key (header `x-subq-cache-key`, which subq's teacher client sends = its
durable cache key; else a sha256 of the request body) how many good 200 replies were served, so tests can prove
that no completed call was sent twice.

`TeacherServer(...)` starts one in a background process on 127.0.0.1 with a free port:

    with TeacherServer(rpm=600, latency_s=0.2) as ts:
        client = openai.OpenAI(base_url=ts.base_url, api_key="unused")
        ...; ts.stats()["by_status"]
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from functools import lru_cache
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from subq.costs import estimate_tokens
from subq.problems import DATA_DIR
from pipelines.teacher_server_config import TeacherServerConfig as TeacherServerConfig

RAW_RECORDINGS = DATA_DIR / "gsm8k-ai-subq" / "qg_test_data_raw.jsonl"
GSM8K_FILES = [DATA_DIR / "gsm8k" / n for n in ("train.jsonl", "test.jsonl")]
DEFAULT_MODELS = ("gpt-3.5-turbo", "gpt-3.5-turbo-1106", "gpt-4o-mini", "gpt-4o", "subq-teacher")


# ------------------------------------------------------------------ replay data


def _norm(text: str) -> str:
    return " ".join(text.split())


@lru_cache(maxsize=1)
def recordings() -> tuple[dict, dict]:
    """(released raw records by normalised problem, GSM8K records by normalised problem)."""
    rec = {}
    for line in RAW_RECORDINGS.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            rec[_norm(r["problem"])] = r
    gold = {}
    for path in GSM8K_FILES:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                gold.setdefault(_norm(r["question"]), r["answer"])
    return rec, gold


def _solution_steps(solution: str) -> tuple[list[str], str]:
    """GSM8K worked solution -> (clean steps, final answer text)."""
    body, _, final = solution.partition("####")
    steps = [re.sub(r"<<[^>]*>>", "", s).strip() for s in body.strip().split("\n") if s.strip()]
    return steps, final.strip().replace(",", "")


def _step_question(step: str) -> str:
    """A sub-question from a solution step: what the step computes."""
    left = re.split(r"\s*=", step, maxsplit=1)[0].strip().rstrip(".")
    return f"How do we compute: {left}?"


def _question_sentence(problem: str) -> str:
    parts = re.split(r"(?<=[.!])\s+", problem.strip())
    return parts[-1] if parts else problem


class Replier:
    """Builds the teacher's reply text for a parsed prompt: replay when recorded, else synthetic."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def reply(self, content: str, sample_index: Optional[int]) -> tuple[str, str]:
        from subq.prompts import parse_prompt

        parsed = parse_prompt(content)
        if parsed is None:
            return ("(subq teacher-server: not a subq prompt) Q1: What is being asked?\n\nFinal answer: 0", "synthetic")
        tid, problem, questions = parsed
        from subq.parsers import parse_subquestions

        rec, gold = recordings()
        key = _norm(problem)
        r = rec.get(key)
        solution = gold.get(key)
        if solution is None and r is not None:
            solution = r["answer"]
        steps, final = _solution_steps(solution) if solution else ([], "")
        if not final:
            nums = re.findall(r"\d+(?:\.\d+)?", problem)
            final = nums[-1] if nums else "0"
        idx = sample_index if sample_index is not None else self.rng.randrange(3)
        if tid in ("paper_qg", "doc_decompose"):
            if r is not None and idx < len(r["questions"]):
                text, prov = r["questions"][idx], "replay"
            else:
                qs = [_step_question(s) for s in steps] or ["What quantities does the problem give?",
                                                            _question_sentence(problem)]
                if idx % 2 == 1 and len(qs) > 1:  # a different, still valid, set for another sample
                    qs = qs[:-1] + [_question_sentence(problem)]
                text, prov = "\n".join(f"Q{i}: {q}" for i, q in enumerate(qs, 1)), "synthetic"
            if tid == "doc_decompose":
                qs = parse_subquestions(text).questions[:3]
                text = "\n".join(q if q.strip().endswith("?") else q.strip() + "?" for q in qs)
            return text, prov
        if tid in ("paper_qa", "doc_solve"):
            if r is not None and tid == "paper_qa":
                for qtext, ans in zip(r["questions"], r["answers"]):
                    if [_norm(q) for q in parse_subquestions(qtext).questions] == [_norm(q) for q in questions or []]:
                        return ans, "replay"
            if r is not None and r["answers"]:  # the recorded teacher's own final answer, not the gold
                m = re.search(r"final answer:\s*(.*)", r["answers"][idx % len(r["answers"])], re.IGNORECASE)
                if m and m.group(1).strip():
                    final = m.group(1).strip().splitlines()[0]
            n = max(1, len(questions or []))
            lines = [f"A{i}: {steps[min(i - 1, len(steps) - 1)] if steps else 'We use the numbers given.'}"
                     for i in range(1, n + 1)]
            if tid == "doc_solve":
                return " ".join(lines) + f" The answer is: {final}", "synthetic"
            return "\n".join(lines) + f"\n\nFinal answer: {final}", "synthetic"
        # paper_feedback: synthetic votes, "No" for repeated questions and a deterministic ~15% of others
        seen, out = set(), []
        for i, q in enumerate(questions or [], 1):
            h = int(hashlib.sha256(f"{q}|{idx}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            vote = "No" if _norm(q).lower() in seen or h < 0.15 else "Yes"
            seen.add(_norm(q).lower())
            out.append(f"Q{i}: {vote}")
        return "\n".join(out) or "Q1: No", "synthetic"


# ------------------------------------------------------------------ rate limiting (server side)


class _Bucket:
    """Continuous-refill token bucket; capacity = burst_s seconds of the per-minute limit."""

    def __init__(self, per_min: Optional[float], burst_s: float, clock=time.monotonic):
        self.rate = per_min / 60.0 if per_min else None
        self.capacity = max(1.0, (self.rate or 0) * burst_s)
        self.level = self.capacity
        self.clock = clock
        self.t = clock()

    def _refill(self):
        now = self.clock()
        if self.rate:
            self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now

    def wait_for(self, amount: float) -> float:
        """0 if `amount` fits now (level > 0 for token debt), else seconds until it does."""
        if not self.rate:
            return 0.0
        self._refill()
        need = min(amount, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, amount: float):
        if self.rate:
            self._refill()
            self.level -= amount

    def reset_s(self) -> float:
        return 0.0 if not self.rate else max(0.0, (self.capacity - self.level) / self.rate)


def _fmt_duration(s: float) -> str:
    return f"{int(s * 1000)}ms" if s < 1 else f"{s:.3f}s"


# ------------------------------------------------------------------ the bill (OpenAI Usage API shape)

BUCKET_S = {"1m": 60, "1h": 3600, "1d": 86400}
BUCKET_LIMIT = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}  # (default, max) buckets a page


class UsageLedger:
    """Every billed reply: (unix time, model, batch?, input tokens, output tokens). Thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events: list[tuple[float, str, bool, int, int]] = []

    def add(self, model: str, input_tokens: int, output_tokens: int, batch: bool = False) -> None:
        with self.lock:
            self.events.append((time.time(), str(model), bool(batch), int(input_tokens), int(output_tokens)))

    def page(self, start_time: int, end_time: Optional[int] = None, bucket_width: str = "1d",
             group_by: Optional[list[str]] = None, models: Optional[list[str]] = None, batch: Optional[bool] = None,
             limit: Optional[int] = None) -> dict:
        """GET /v1/organization/usage/completions: buckets of `bucket_width` from `start_time` (inclusive) to
        `end_time` (exclusive; default now), each with one result per group (model and/or batch when grouped)."""
        width = BUCKET_S[bucket_width]
        default, most = BUCKET_LIMIT[bucket_width]
        limit = min(int(limit or default), most)
        end = int(end_time if end_time is not None else time.time() + 1)
        group_by = [g for g in (group_by or []) if g in ("model", "batch")]
        with self.lock:
            events = list(self.events)
        data = []
        t = int(start_time)
        while t < end and len(data) < limit:
            hi = min(t + width, end)
            groups: dict = {}
            for ts, model, is_batch, it, ot in events:
                if not (t <= ts < hi) or (models and model not in models) or (batch is not None and is_batch != batch):
                    continue
                g = (model if "model" in group_by else None, is_batch if "batch" in group_by else None)
                r = groups.setdefault(g, [0, 0, 0])
                r[0] += it
                r[1] += ot
                r[2] += 1
            results = [{"object": "organization.usage.completions.result", "input_tokens": v[0],
                        "output_tokens": v[1], "input_cached_tokens": 0, "input_audio_tokens": 0,
                        "output_audio_tokens": 0, "num_model_requests": v[2], "project_id": None, "user_id": None,
                        "api_key_id": None, "model": g[0], "batch": g[1]} for g, v in groups.items()]
            data.append({"object": "bucket", "start_time": t, "end_time": hi, "results": results})
            t = hi
        more = t < end
        return {"object": "page", "data": data, "has_more": more, "next_page": str(t) if more else None}


# ------------------------------------------------------------------ the app


def create_app(cfg: TeacherServerConfig):
    app = FastAPI(title="subq teacher server", docs_url=None, redoc_url=None)
    rng = random.Random(cfg.seed)
    replier = Replier(random.Random(cfg.seed + 1))
    from pipelines.teacher_batch import batch_router

    ledger = UsageLedger()
    app.include_router(batch_router(cfg, replier, ledger=ledger))
    req_bucket, tok_bucket = _Bucket(cfg.rpm, cfg.burst_s), _Bucket(cfg.tpm, cfg.burst_s)
    lock = threading.Lock()
    stats = {"total": 0, "by_status": {}, "malformed": 0, "timeouts": 0, "in_flight": 0, "max_in_flight": 0,
             "prompt_tokens": 0, "completion_tokens": 0, "charged_tokens": 0, "by_template": {}, "provenance": {},
             "completed_by_key": {}, "started": time.time()}
    received: list[dict] = []  # record_prompts: {"model", "messages", "reply", "provenance", "t"} per answered call

    def count(status: int):
        stats["by_status"][str(status)] = stats["by_status"].get(str(status), 0) + 1

    def ratelimit_headers() -> dict:
        h = {}
        for kind, b, lim in (("requests", req_bucket, cfg.rpm), ("tokens", tok_bucket, cfg.tpm)):
            if lim:
                h[f"x-ratelimit-limit-{kind}"] = str(int(lim))
                h[f"x-ratelimit-remaining-{kind}"] = str(max(0, int(b.level)))
                h[f"x-ratelimit-reset-{kind}"] = _fmt_duration(b.reset_s())
        return h

    def error(status: int, message: str, etype: str, code: str | None = None, headers: dict | None = None):
        count(status)
        return JSONResponse({"error": {"message": message, "type": etype, "param": None, "code": code}},
                            status_code=status, headers=headers)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        names = cfg.models or list(DEFAULT_MODELS)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "subq"} for m in names]}

    @app.get("/v1/stats")
    async def get_stats(keys: bool = True):
        with lock:
            out = json.loads(json.dumps(stats))
        out["duplicates"] = sum(1 for v in stats["completed_by_key"].values() if v > 1)
        out["completed"] = sum(stats["completed_by_key"].values())
        out["config"] = {k: v for k, v in asdict(cfg).items() if k != "api_key"}
        if not keys:
            out.pop("completed_by_key")
        return out

    @app.get("/v1/organization/usage/completions")
    async def usage_completions(request: Request, start_time: int, end_time: Optional[int] = None,
                                bucket_width: str = "1d", batch: Optional[bool] = None, limit: Optional[int] = None,
                                page: Optional[str] = None):
        if bucket_width not in BUCKET_S:
            return error(400, f"bucket_width must be one of {sorted(BUCKET_S)}", "invalid_request_error")
        q = request.query_params
        group_by = q.getlist("group_by") + q.getlist("group_by[]")
        models = q.getlist("models") + q.getlist("models[]")
        start = int(page) if page and page.isdigit() else start_time
        return ledger.page(start, end_time, bucket_width, [x for g in group_by for x in g.split(",")],
                           [x for m in models for x in m.split(",")] or None, batch, limit)

    @app.get("/v1/prompts")
    async def get_prompts():
        """What the server received and answered (200, online chat), in arrival order; record_prompts only."""
        if not cfg.record_prompts:
            return error(404, "prompt recording is off (start with record_prompts=True)", "invalid_request_error")
        with lock:
            return {"object": "list", "data": json.loads(json.dumps(received))}

    @app.post("/v1/stats/reset")
    async def reset_stats():
        with lock:
            for k in ("total", "malformed", "timeouts", "max_in_flight", "prompt_tokens", "completion_tokens",
                      "charged_tokens"):
                stats[k] = 0
            for k in ("by_status", "by_template", "provenance", "completed_by_key"):
                stats[k] = {}
            stats["started"] = time.time()
        return {"reset": True}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        with lock:
            stats["total"] += 1
        raw = await request.body()
        if cfg.api_key is not None:
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {cfg.api_key}":
                return error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        try:
            body = json.loads(raw)
            msgs = body["messages"]
            model = body["model"]
            content = "\n".join(m.get("content") or "" for m in msgs if isinstance(m, dict))
        except (ValueError, KeyError, TypeError) as e:
            return error(400, f"invalid request body: {e}", "invalid_request_error")
        if body.get("stream"):
            return error(400, "stream=true is not supported by the subq teacher server", "invalid_request_error")
        if cfg.models is not None and model not in cfg.models:
            return error(404, f"The model `{model}` does not exist.", "invalid_request_error", "model_not_found")
        if cfg.reject_problems and any(t in content for t in cfg.reject_problems):
            return error(400, "This model's maximum context length is 4097 tokens; your messages resulted in 5000 "
                         "tokens. Please reduce the length of the messages.", "invalid_request_error",
                         "context_length_exceeded")
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)
        prompt_tokens = estimate_tokens(content)
        with lock:
            wait = max(req_bucket.wait_for(1), tok_bucket.wait_for(prompt_tokens + max_tokens))
            if wait > 0:
                h = ratelimit_headers()
                h.update({"retry-after": str(max(1, math.ceil(wait))), "retry-after-ms": str(int(wait * 1000) + 1)})
                return error(429, "Rate limit reached for requests. Please try again later.", "requests",
                             "rate_limit_exceeded", h)
            req_bucket.take(1)
            tok_bucket.take(prompt_tokens + max_tokens)
            stats["charged_tokens"] += prompt_tokens + max_tokens  # what the token limit counted
            headers = ratelimit_headers()
            stats["in_flight"] += 1
            stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
            u = rng.random()
        try:
            if u < cfg.fail_rate:
                status = rng.choice([500, 503])
                return error(status, "The server had an error while processing your request.", "server_error")
            if u < cfg.fail_rate + cfg.timeout_rate:
                with lock:
                    stats["timeouts"] += 1
                await asyncio.sleep(cfg.timeout_hang_s)
                return error(504, "upstream timed out", "server_error")
            if cfg.latency_s or cfg.latency_jitter_s:
                await asyncio.sleep(max(0.0, rng.gauss(cfg.latency_s, cfg.latency_jitter_s)))
            sample = request.headers.get("x-subq-sample-index")
            sample_index = int(sample) if sample and sample.isdigit() else None
            malformed = u < cfg.fail_rate + cfg.timeout_rate + cfg.malformed_rate
            if malformed and rng.random() < cfg.malformed_body_share:  # a body that is not even valid JSON
                text, _ = replier.reply(content, sample_index)  # generated (and billed), then cut in transit
                ledger.add(model, prompt_tokens, min(estimate_tokens(text), max_tokens))
                with lock:
                    count(200)
                    stats["malformed"] += 1
                return Response('{"id": "chatcmpl-broken", "choices": [{"message": ', media_type="application/json",
                                headers=headers)
            if malformed:
                text, prov = "I'm sorry, but I can't help with that request right now.", "malformed"
            else:
                text, prov = replier.reply(content, sample_index)
            completion_tokens = min(estimate_tokens(text), max_tokens)
            key = request.headers.get("x-subq-cache-key") or hashlib.sha256(raw).hexdigest()
            from subq.prompts import parse_prompt

            parsed = parse_prompt(content)
            ledger.add(model, prompt_tokens, completion_tokens)
            with lock:
                count(200)
                stats["prompt_tokens"] += prompt_tokens
                stats["completion_tokens"] += completion_tokens
                stats["provenance"][prov] = stats["provenance"].get(prov, 0) + 1
                tname = parsed[0] if parsed else "other"
                stats["by_template"][tname] = stats["by_template"].get(tname, 0) + 1
                if malformed:
                    stats["malformed"] += 1
                else:
                    stats["completed_by_key"][key] = stats["completed_by_key"].get(key, 0) + 1
                if cfg.record_prompts:
                    received.append({"model": model, "messages": msgs, "reply": text, "provenance": prov,
                                     "t": time.time()})
            reply = {
                "id": "chatcmpl-subq" + hashlib.sha256(f"{key}{time.time()}".encode()).hexdigest()[:20],
                "object": "chat.completion", "created": int(time.time()), "model": model,
                "system_fingerprint": f"subq-{prov}",
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
                "subq_provenance": prov,
            }
            headers["x-subq-provenance"] = prov
            return Response(json.dumps(reply), media_type="application/json", headers=headers)
        finally:
            with lock:
                stats["in_flight"] -= 1

    return app


def serve(cfg: TeacherServerConfig) -> None:
    """Run the server in the foreground (blocks)."""
    import uvicorn

    recordings()  # load before accepting requests
    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level="warning", access_log=False)


# ------------------------------------------------------------------ background helper


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TeacherServer:
    """Context manager: a teacher server in a background process on 127.0.0.1 with a free port.
    Keyword arguments are `TeacherServerConfig` fields (e.g. rpm=600, latency_s=0.2, fail_rate=0.05)."""

    def __init__(self, startup_timeout_s: float = 60.0, **config):
        config.setdefault("host", "127.0.0.1")
        self.fixed_port = "port" in config  # e.g. a restart on the same endpoint; else a free port
        self.config = TeacherServerConfig(**config)
        self.startup_timeout_s = startup_timeout_s
        self.proc: Optional[subprocess.Popen] = None

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}/v1"

    def start(self) -> "TeacherServer":
        import httpx

        for _ in range(5):
            if not self.fixed_port:
                self.config.port = free_port()
            env = dict(os.environ)
            env["SUBQ_TEACHER_SERVER_CONFIG"] = json.dumps(asdict(self.config))
            self.proc = subprocess.Popen([sys.executable, "-m", "pipelines.teacher_server", "--from-env"], env=env,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.time() + self.startup_timeout_s
            while time.time() < deadline and self.proc.poll() is None:
                try:
                    if httpx.get(self.base_url + "/models", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    time.sleep(0.1)
            self.stop()
        raise RuntimeError("teacher server did not start")

    def stats(self, keys: bool = True) -> dict:
        import httpx

        return httpx.get(self.base_url + "/stats", params={"keys": str(keys).lower()}, timeout=30).json()

    def usage(self, **params) -> dict:
        """GET /v1/organization/usage/completions (params as the API's: start_time, bucket_width, group_by, ...)."""
        import httpx

        params.setdefault("start_time", 0)
        return httpx.get(self.base_url + "/organization/usage/completions", params=params, timeout=30).json()

    def bill(self) -> dict:
        """The whole bill, read page by page from the usage API (1-day buckets, grouped by model and batch):
        {"input_tokens", "output_tokens", "requests", "online": {same}, "batch": {same}, "by_model": {...}}."""
        tot = {"input_tokens": 0, "output_tokens": 0, "requests": 0}
        out = {**tot, "online": dict(tot), "batch": dict(tot), "by_model": {}}
        start = int(time.time()) - 86400 * 30
        start -= start % 86400
        while True:
            page = self.usage(start_time=start, bucket_width="1d", group_by=["model", "batch"], limit=31)
            for b in page["data"]:
                for r in b["results"]:
                    for d in (out, out["batch" if r["batch"] else "online"],
                              out["by_model"].setdefault(r["model"], dict(tot))):
                        d["input_tokens"] += r["input_tokens"]
                        d["output_tokens"] += r["output_tokens"]
                        d["requests"] += r["num_model_requests"]
            if not page["has_more"]:
                return out
            start = int(page["next_page"])

    def prompts(self) -> list[dict]:
        """GET /v1/prompts: [{"model", "messages", "reply", "provenance", "t" (unix time)}] of every answered call
        (start with record_prompts=True)."""
        import httpx

        r = httpx.get(self.base_url + "/prompts", timeout=30)
        r.raise_for_status()
        return r.json()["data"]

    def reset_stats(self) -> None:
        import httpx

        httpx.post(self.base_url + "/stats/reset", timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "TeacherServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
