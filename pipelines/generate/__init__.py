"""Generate GSM8K-AI-SubQ at scale: Ray Data shards problems across rate-limited teacher actors.

    subq generate --input gsm8k:train --output out/gsm8k-ai-subq --model gpt-3.5-turbo \\
        --n-sets 3 --n-feedback 3 --rpm 3500 --tpm 90000 --actors 2,8 --max-cost-usd 20
    subq generate --config generate.yaml --dry-run            # token and cost estimate, no calls
    subq generate --config generate.yaml --retry-failed       # retry only the recorded failures
    # offline, against the local teacher server (replay of the released ChatGPT replies):
    subq teacher-server --port 8300 --rpm 600 &
    OPENAI_API_KEY=unused subq generate --input gsm8k:test --limit 40 --output out/demo \\
        --base-url http://127.0.0.1:8300/v1 --rpm 600 --actors 2,2
    # on a cluster (the key travels in the job's environment, never in its metadata):
    ray job submit --working-dir . -- python -m pipelines.generate --config generate.yaml \\
        --output s3://bucket/gsm8k-ai-subq

Per problem (one row): `n_sets` QG calls, then for each set one QA call and `n_feedback` feedback calls
(paper: 3 x (1 + 1 + 3) = 15 calls), then rewards by the foundation scorer (`SubQuestionSet.from_texts`).
A row's `gold_answer` is the release's form "#### N" (the text after GSM8K's `####`), as the paper's generator
used it, so exports match the released files and the paper's reward rule sees the final answer.
All calls go through `actors.teacher.TeacherClient` (openai SDK, retries, durable cache) and ONE cluster-wide
`actors.limiter.RateLimiter` per (endpoint, model); a separate job-scoped RateLimiter holds `--max-cost-usd`.

Output directory (local path or any pyarrow filesystem URI):

    OUTPUT/
      config.yaml                  the resolved config (no key: only the NAME of its environment variable)
      parts/part-<hash>.parquet    rows in subq.schema.ROW_SCHEMA, one file per finished batch, named by the
                                   hash of the batch's problem ids (a retried batch overwrites, never duplicates)
      failures/part-<hash>.parquet problems that exhausted their retries: problem_id, problem, source,
                                   source_index, stage, error_type, reason, attempts, time
      cache/<k[:2]>/<k>.json       durable request cache, one file per good teacher reply (content-addressed)
      paper_raw.jsonl              export: the release's qg_*_data_raw.jsonl format (one object a line)
      paper_dataset.json           export: the release's qg_*_dataset.jsonl training format (ONE JSON list)
      failures.jsonl               export: the failures still open (problems without a row), one a line
      summary.json                 the final summary (also printed as the last stdout line)
      batch/state.json             --api batch only (pipelines.batch): each request shard's file id and batch id,
                                   written as soon as they exist, its status and per-request errors
      batch/requests/<shard>.jsonl --api batch only: the request files uploaded to the provider

Resume and exactly once: re-running the same command skips problems that have a row and (unless
`--retry-failed`) those with a recorded failure; calls already answered come from `cache/`, so only calls
that were in flight when a job died are sent again. Exports de-duplicate by problem id. Ctrl-C exports the
finished rows, writes summary.json (`"stopped": "interrupted"`) and exits 130; SIGTERM does the same and exits 143
(subq.stop); `--max-cost-usd` stops the same
way with `"stopped": "budget"` (exit 0); a bad key or request stops with one `error:` line (exit 2).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import socket
import sys
import time
from typing import Optional

from actors.teacher import (TeacherActor, TeacherAuthError, TeacherBudgetExceeded, TeacherError,
                            TeacherRequestError, TeacherStopped)
from pipelines.generate_config import GenerateConfig  # noqa: F401  (the job's config, defined once there)
from subq import storage
from subq.config import load_config
from subq.errors import ConfigError, SubqError


# ------------------------------------------------------------------ per-problem work (inside actors)


def release_gold(gold_answer: str) -> str:
    """The gold as the release's generator saw it: "#### N" (the text after the last ####). The paper's rewards
    take the FIRST number of the gold string, so a GSM8K worked solution must not be passed as is."""
    return "#### " + gold_answer.rsplit("####", 1)[-1].strip() if "####" in gold_answer else gold_answer


def _validators(family: str):
    from subq.parsers import FINAL_ANSWER, DOC_ANSWER, parse_doc_subquestions, parse_feedback, parse_subquestions

    def qg(text):
        qs = (parse_doc_subquestions(text) if family == "doc" else parse_subquestions(text)).questions
        return None if qs else "no sub-questions in the QG reply"

    def qa(text):
        marker = DOC_ANSWER if family == "doc" else FINAL_ANSWER
        return None if marker.search(text or "") else "no final-answer marker in the QA reply"

    def feedback(n):
        return lambda text: parse_feedback(text, n).reason

    return qg, qa, feedback


def calls_after_qg(family: str, problem: str, set_index: int, n_feedback: int, questions: list[str]) -> list[tuple]:
    """The calls a set makes once its QG reply is parsed: [(stage, template id, sample index, messages)], QA
    first, then the feedback calls (both read only the problem and the sub-questions). Online and batch mode use
    the same sample indices, so both hit the same request-cache entries."""
    from subq.prompts import messages, template_for

    qa, fb = template_for(family, "qa"), template_for(family, "feedback")
    return [("qa", qa, set_index, messages(qa, problem, questions))] + [
        ("feedback", fb, set_index * n_feedback + j, messages(fb, problem, questions)) for j in range(n_feedback)]


def split_qg(family: str, qg_text: str) -> tuple[list[str], str]:
    """A QG reply -> (its sub-questions, the set's questions text as stored in the row)."""
    from subq.parsers import format_subquestions, parse_doc_subquestions, parse_subquestions

    if family == "doc":
        qs = parse_doc_subquestions(qg_text).questions
        return qs, format_subquestions(qs)
    return parse_subquestions(qg_text).questions, qg_text


def build_set(family: str, qtext: str, answer_text: str, gold: str, feedback_texts: list[str]):
    """One SubQuestionSet from its replies, with the paper's rewards."""
    from subq.schema import SubQuestionSet

    sset = SubQuestionSet.from_texts(qtext, answer_text, gold, feedback_texts)
    if family == "doc":  # DoC answers end "The answer is: X", which the paper rule cannot read; strict can
        from subq.scoring import score

        sset.answer_correctness = 1.0 if score(answer_text, gold, "strict").correct else 0.0
    return sset


def build_row(item: dict, sets: list, job: dict, acct: dict):
    """A problem's SubQRow from its sets and its call accounting (prompt/completion tokens, cost, attempts)."""
    from subq.schema import SubQRow
    from subq.scoring import gold_number

    gold = release_gold(item["gold_answer"])
    return SubQRow(
        problem_id=item["problem_id"], problem=item["problem"], gold_answer=gold,
        true_answer=gold_number(gold, "paper"), sets=list(sets), source=item["source"],
        source_index=item["source_index"], teacher_model=job["model"], template_id=job["template"],
        prompt_tokens=acct["prompt_tokens"], completion_tokens=acct["completion_tokens"], cost_usd=acct["cost_usd"],
        attempts=acct["attempts"], error=None)


async def gather_or_cancel(*aws):
    """asyncio.gather that, when one awaitable raises, cancels the others (their paid calls stop now instead of
    running on for a problem already recorded as failed), waits for them to end, then raises that error."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class GenerateActor(TeacherActor):
    """Ray Data UDF: a batch of problems -> their rows (written as one Parquet part) and per-problem summaries."""

    def __init__(self, client_kwargs: dict, limiter_name: Optional[str], budget_name: Optional[str], job: dict,
                 api_key_ref: Optional[list] = None):
        super().__init__(client_kwargs, limiter_name, api_key_ref=api_key_ref)
        if budget_name:
            import ray

            self.client.budget = ray.get_actor(budget_name, namespace="subq")
        self.job = job
        self.actor_id = f"{socket.gethostname()}:{os.getpid()}"
        self.stopper = self.client.budget  # job-scoped; the shared rate limiter is never stopped by one job

    async def process(self, item: dict) -> dict:
        """One problem -> its outcome and accounts. This run's tokens and $ (`new_*`, by stage) are what the
        provider billed: every reply that arrived (re-sampled and invalid ones included, counted by the client
        into BILLING), not only the replies kept in the row."""
        out = await self._process(item)
        out["new_prompt_tokens"] = out.pop("billed_prompt_tokens", 0)
        out["new_completion_tokens"] = out.pop("billed_completion_tokens", 0)
        out["new_cost_usd"] = out.pop("billed_cost_usd", 0.0)
        out.pop("billed_replies", None)
        for tid, (pt, ct, usd) in (out.pop("billed_by_template", None) or {}).items():
            st = STAGE_OF.get(tid.split("_", 1)[-1], "feedback")
            out[f"{st}_prompt_tokens"] += pt
            out[f"{st}_completion_tokens"] += ct
            out[f"{st}_cost_usd"] += usd
        return out

    async def _process(self, item: dict) -> dict:
        from subq.prompts import messages, template_for
        from subq.schema import SubQuestionSet

        job, c = self.job, self.client
        fam = job["template"]
        qg_tid = template_for(fam, "qg")
        v_qg, v_qa, v_fb = _validators(fam)
        acct = {"calls": 0, "cached": 0, "attempts": 0, "n_429": 0, "prompt_tokens": 0, "completion_tokens": 0,
                "cost_usd": 0.0, "new_cost_usd": 0.0, "new_prompt_tokens": 0, "new_completion_tokens": 0,
                "maybe_billed": 0, "maybe_billed_usd": 0.0, **{k: 0 for k in STAGE_KEYS}}
        stage = {"name": "qg"}
        from actors.teacher import BILLING

        BILLING.set(acct)  # this problem's task: every billed reply (and maybe-billed call) is counted into acct

        async def call(msgs, tid, sample, validate, accept_invalid):
            r = await c.chat(msgs, temperature=job["temperature"], max_tokens=job["max_tokens"], sample_index=sample,
                             template_id=tid, validate=validate, accept_invalid=accept_invalid)
            acct["calls"] += 1
            acct["cached"] += int(r.cached)
            acct["attempts"] += r.attempts
            acct["n_429"] += r.n_429
            acct["prompt_tokens"] += r.prompt_tokens
            acct["completion_tokens"] += r.completion_tokens
            acct["cost_usd"] += r.cost_usd  # the row's own replies (this run's spend: the BILLING counts)
            return r

        problem, gold = item["problem"], release_gold(item["gold_answer"])

        async def one_set(i: int) -> SubQuestionSet:
            q = await call(messages(qg_tid, problem), qg_tid, i, v_qg, False)
            qs, qtext = split_qg(fam, q.text)
            stage["name"] = "qa"
            (_, qa_t, qa_s, qa_m), *fb_calls = calls_after_qg(fam, problem, i, job["n_feedback"], qs)
            a = await call(qa_m, qa_t, qa_s, v_qa, True)
            stage["name"] = "feedback"
            fbs = await gather_or_cancel(*(call(m, t, s, v_fb(len(qs)), True) for _, t, s, m in fb_calls))
            return build_set(fam, qtext, a.text, gold, [f.text for f in fbs])

        base = {k: item[k] for k in ("problem_id", "source", "source_index")}
        try:
            sets = await gather_or_cancel(*(one_set(i) for i in range(job["n_sets"])))
        except TeacherBudgetExceeded as e:
            return {**base, "status": "budget", "error": str(e), "row": None, **acct}
        except TeacherStopped as e:
            return {**base, "status": "stopped", "error": str(e), "row": None, **acct}
        except (TeacherAuthError, TeacherRequestError) as e:
            if isinstance(e, TeacherRequestError) and not e.fatal:  # one odd request (context length, a filter):
                return {**base, "status": "failed", "error": str(e), "error_type": type(e).__name__,  # recorded
                        "stage": stage["name"], "row": None, **acct}
            # a bad key or unknown model fails every call: stop this actor's other calls and (via the budget
            # actor when there is one) every other actor's, now
            self.client.fatal = f"stopped after a fatal error: {e}"
            if self.stopper is not None:
                await self.stopper.stop.remote(self.client.fatal)
            return {**base, "status": "fatal", "error": str(e), "error_type": type(e).__name__, "row": None, **acct}
        except TeacherError as e:
            return {**base, "status": "failed", "error": str(e), "error_type": type(e).__name__,
                    "stage": stage["name"], "row": None, **acct}
        except Exception as e:  # never lose a problem to an unexpected error: record it as a failure
            return {**base, "status": "failed", "error": c._redact(f"{type(e).__name__}: {e}")[:500],
                    "error_type": type(e).__name__, "stage": stage["name"], "row": None, **acct}
        return {**base, "status": "ok", "error": None, "row": build_row(item, sets, job, acct), **acct}

    async def __call__(self, batch: dict) -> dict:
        from subq.schema import write_parquet
        from actors.teacher import _py

        n = len(batch["problem_id"])
        items = [{k: _py(v[i]) for k, v in batch.items()} for i in range(n)]
        outs = await asyncio.gather(*(self.process(it) for it in items))
        rows = [o["row"] for o in outs if o["status"] == "ok"]
        fails = [dict(problem_id=o["problem_id"], problem=it["problem"], source=o["source"],
                      source_index=o["source_index"], stage=o.get("stage"), error_type=o.get("error_type"),
                      reason=o["error"], attempts=o["attempts"], time=time.time())
                 for o, it in zip(outs, items) if o["status"] == "failed"]
        out = self.job["output"]
        if rows:
            name = _part_name([r.problem_id for r in rows])
            await asyncio.to_thread(write_parquet, rows, storage.join(out, "parts", name))
        if fails:
            import pyarrow as pa

            name = _part_name([f["problem_id"] for f in fails])
            await asyncio.to_thread(_write_table, pa.Table.from_pylist(fails, schema=FAILURE_SCHEMA),
                                    storage.join(out, "failures", name))
        for o in outs:
            o["actor"] = self.actor_id
        keys = ["problem_id", "status", "error", "actor", "calls", "cached", "attempts", "n_429", "prompt_tokens",
                "completion_tokens", "cost_usd", "new_cost_usd", "new_prompt_tokens", "new_completion_tokens",
                "maybe_billed", "maybe_billed_usd", *STAGE_KEYS]
        return {k: [o.get(k) for o in outs] for k in keys}


# this run's tokens and $ by stage (summary.json "by_stage"); template ids end in the stage's role
STAGE_OF = {"qg": "qg", "decompose": "qg", "qa": "qa", "solve": "qa", "feedback": "feedback"}
STAGE_KEYS = tuple(f"{st}_{k}" for st in ("qg", "qa", "feedback") for k in ("prompt_tokens", "completion_tokens",
                                                                              "cost_usd"))


def _part_name(ids: list[str]) -> str:
    return "part-" + hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16] + ".parquet"


def _failure_schema():
    import pyarrow as pa

    return pa.schema([("problem_id", pa.string()), ("problem", pa.string()), ("source", pa.string()),
                      ("source_index", pa.int64()), ("stage", pa.string()), ("error_type", pa.string()),
                      ("reason", pa.string()), ("attempts", pa.int64()), ("time", pa.float64())])


FAILURE_SCHEMA = _failure_schema()


def _write_table(table, location: str) -> None:
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(location, buf.getvalue())


# ------------------------------------------------------------------ driver side


def done_ids(output: str):
    """The ids of the problems with a row in OUTPUT, as a pyarrow array: one column read from the finished parts
    (writers' temps skipped), no row objects, so resuming a million problems stays small and fast."""
    import pyarrow as pa

    from subq.schema import read_parquet_table

    parts = storage.join(output, "parts")
    if not storage.list_files(parts, ".parquet"):
        return pa.array([], pa.string())
    return read_parquet_table(parts, columns=["problem_id"]).column(0).combine_chunks()


def read_failures(output: str, done) -> dict:
    """The open failures in OUTPUT by problem id (the newest of each), leaving out problems in DONE (a row wins)."""
    import pyarrow.compute as pc

    fails: dict = {}
    fdir = storage.join(output, "failures")
    if storage.list_files(fdir, ".parquet"):
        from subq.schema import read_parquet_table

        ft = read_parquet_table(fdir, schema=FAILURE_SCHEMA)
        ft = ft.filter(pc.invert(pc.is_in(ft.column("problem_id"), value_set=done)))
        for f in ft.to_pylist():
            if f["problem_id"] not in fails or f["time"] > fails[f["problem_id"]]["time"]:
                fails[f["problem_id"]] = f
    return fails


def estimate(cfg: GenerateConfig, problems, prices) -> dict:
    """Dry-run estimate: calls, prompt tokens (rendered prompts), completion tokens (typical and upper bound)."""
    from subq.costs import estimate_tokens
    from subq.prompts import render, template_for

    fam = cfg.template
    qg, qa, fb = (template_for(fam, r) for r in ("qg", "qa", "feedback"))
    calls = prompt = typical = 0
    for p in problems:
        steps = max(2, p.gold_answer.count("\n"))  # GSM8K solutions: about one sub-question per step
        qs = ["How many items are there in this step of the problem?"] * steps
        per_set = estimate_tokens(render(qg, p.problem)) + estimate_tokens(render(qa, p.problem, qs)) \
            + cfg.n_feedback * estimate_tokens(render(fb, p.problem, qs))
        prompt += cfg.n_sets * per_set
        typical += cfg.n_sets * (steps * 14 + steps * 20 + 6 + cfg.n_feedback * steps * 4)
        calls += cfg.n_sets * (2 + cfg.n_feedback)
    upper = calls * cfg.max_tokens
    price = prices.price(cfg.model)
    return {"dry_run": True, "problems": len(problems), "calls": calls, "prompt_tokens": prompt,
            "completion_tokens_typical": typical, "completion_tokens_max": upper,
            "cost_usd_typical": round(price.cost(prompt, typical), 6), "cost_usd_max": round(price.cost(prompt, upper), 6),
            "model": cfg.model, "price_per_1k": {"input": price.input_per_1k, "output": price.output_per_1k},
            "minutes_at_rpm": round(calls / cfg.rpm, 2) if cfg.rpm else None}


class Progress:
    """The live progress line: rows, req/s, tokens/s, $ spent, 429s, ETA."""

    def __init__(self, total: int, interval_s: float, stream=None):
        from subq import console

        self.total, self.interval_s, self.stream = total, interval_s, stream or console.err()
        self.t0 = self.last = time.time()
        self.actors: set[str] = set()
        from collections import Counter

        self.reasons: Counter = Counter()  # this run's failure reasons (one line each)
        self.c = {"rows": 0, "failed": 0, "budget": 0, "stopped": 0, "fatal": 0, "calls": 0, "cached": 0,
                  "attempts": 0, "n_429": 0, "new_prompt_tokens": 0, "new_completion_tokens": 0, "new_cost_usd": 0.0,
                  "maybe_billed": 0, "maybe_billed_usd": 0.0, **{k: 0 for k in STAGE_KEYS}}
        self.status_fn = None  # optional: extra text for the line (e.g. the limiter's capped Retry-After)

    def _problems_counter(self):
        """Ray metric `subq_generate_problems{status}` (rows done, failed, ...) when the driver is in Ray."""
        if getattr(self, "_metric", None) is None:
            self._metric = False
            try:
                import ray

                if ray.is_initialized():
                    from ray.util.metrics import Counter

                    self._metric = Counter("subq_generate_problems", description="problems finished by status",
                                           tag_keys=("status",))
            except Exception:
                pass
        return self._metric or None

    def add(self, batch: dict) -> None:
        self.actors.update(batch["actor"])
        metric = self._problems_counter()
        for i, status in enumerate(batch["status"]):
            self.c["rows" if status == "ok" else status] += 1
            if metric is not None:
                metric.inc(1, tags={"status": status})
            if status == "failed":
                self.reasons[" ".join(str(batch["error"][i]).split())[:300]] += 1
            for k in ("calls", "cached", "attempts", "n_429", "new_prompt_tokens", "new_completion_tokens",
                      "new_cost_usd", "maybe_billed", "maybe_billed_usd", *STAGE_KEYS):
                if k in batch:
                    self.c[k] += batch[k][i] or 0
        if time.time() - self.last >= self.interval_s:
            self.print()

    def line(self) -> str:
        el = max(1e-6, time.time() - self.t0)
        done = sum(self.c[k] for k in ("rows", "failed", "budget", "stopped", "fatal"))
        rate = done / el
        eta = f"{(self.total - done) / rate:.0f}s" if rate > 0 else "?"
        tok = self.c["new_prompt_tokens"] + self.c["new_completion_tokens"]
        extra = ""
        if self.status_fn is not None:
            try:
                extra = self.status_fn() or ""
            except Exception:  # the status is a nicety; never let it stop a run
                extra = ""
        return (f"rows {self.c['rows']}/{self.total} failed {self.c['failed']} | {self.c['attempts'] / el:.1f} req/s | "
                f"{tok / el:.0f} tok/s | ${self.c['new_cost_usd']:.4f} | 429s {self.c['n_429']} | "
                f"cached {self.c['cached']} | ETA {eta}" + (f" | {extra}" if extra else ""))

    def print(self) -> None:
        self.last = time.time()
        print(self.line(), file=self.stream, flush=True)


def compact_parts(output: str) -> int:
    """Safety net for exactly-once: if any problem id appears in more than one part (it cannot in normal
    operation: a retried batch overwrites its own part), rewrite the parts as one part holding one row per id.
    Returns the number of duplicate rows removed."""
    from subq.schema import read_parquet, read_parquet_table, rows_to_table, sort_rows

    parts_dir = storage.join(output, "parts")
    files = storage.list_files(parts_dir, ".parquet")
    if len(files) < 2:
        return 0
    fs, _ = storage.resolve(parts_dir)
    import pyarrow.compute as pc

    ids = read_parquet_table(parts_dir, columns=["problem_id"]).column(0)
    n_ids = len(ids)
    if pc.count_distinct(ids).as_py() == n_ids:
        return 0
    rows: dict = {}
    for r in read_parquet(parts_dir):
        rows.setdefault(r.problem_id, r)
    ordered = sort_rows(list(rows.values()))
    name = "part-compacted-" + _part_name([r.problem_id for r in ordered])[5:]
    _write_table(rows_to_table(ordered), storage.join(parts_dir, name))
    for f in files:
        if not f.endswith(name):
            fs.delete_file(f)
    return n_ids - len(ordered)


def export(output: str) -> dict:
    """Write paper_raw.jsonl, paper_dataset.json and failures.jsonl from the parts; return counts and paths."""
    from subq.schema import iter_parquet_sorted, write_paper_chunks

    compact_parts(output)
    done = done_ids(output)
    fails = read_failures(output, done)
    parts = storage.join(output, "parts")
    paths = {"paper_raw": storage.join(output, "paper_raw.jsonl"),
             "paper_dataset": storage.join(output, "paper_dataset.json"),
             "failures": storage.join(output, "failures.jsonl"), "parts": storage.join(output, "parts")}
    if len(done):  # streamed in source order, one chunk of row objects at a time (a million rows fit in memory)
        write_paper_chunks(iter_parquet_sorted(parts), {f: paths[f] for f in ("paper_raw", "paper_dataset")})
    storage.write_bytes_atomic(paths["failures"], "".join(json.dumps(f) + "\n" for f in fails.values()).encode())
    return {"rows": len(done), "failures": len(fails), "paths": paths}


# ------------------------------------------------------------------ run manifest and lease

# settings that change what a row holds: a re-run into the same OUTPUT with other values is refused
MANIFEST_FIELDS = ("model", "base_url", "template", "n_sets", "n_feedback", "temperature", "max_tokens")


def manifest_settings(cfg: GenerateConfig) -> dict:
    from actors.teacher import normalize_endpoint

    d = {k: getattr(cfg, k) for k in MANIFEST_FIELDS}
    d["base_url"] = normalize_endpoint(cfg.base_url)
    return d


def check_manifest(cfg: GenerateConfig) -> Optional[dict]:
    """Compare with OUTPUT/manifest.json (written by the first run): SubqError naming each differing field,
    before any call. Returns the recorded settings (None: a new output)."""
    loc = storage.join(cfg.output, "manifest.json")
    if not storage.exists(loc):
        return None
    recorded = json.loads(storage.read_bytes(loc))["settings"]
    now = manifest_settings(cfg)
    diff = [f"{k} {recorded.get(k)!r} -> {now[k]!r}" for k in MANIFEST_FIELDS if recorded.get(k) != now[k]]
    if diff:
        raise SubqError("settings differ from the run that wrote this output: " + ", ".join(diff), source=cfg.output,
                        hint=f"use another --output, or the recorded settings in {loc}")
    return recorded


def write_manifest(cfg: GenerateConfig) -> None:
    loc = storage.join(cfg.output, "manifest.json")
    if not storage.exists(loc):
        storage.write_bytes_atomic(loc, json.dumps({"settings": manifest_settings(cfg), "created": time.time()},
                                                   indent=2).encode())


class OutputLease:
    """OUTPUT/_lease.json = {host, pid, run_id, heartbeat}: one job writes an output at a time.

    Taken with an atomic create-if-absent (`storage.create_exclusive`: link of a complete temp, O_EXCL semantics),
    so of two jobs started at the same instant exactly one gets it. A lease is stale after `timeout_s` without a
    heartbeat (a thread renews it every timeout_s/4, and only while the file is still ours), or at once when its
    process is gone from this host. A stale lease is taken over under a second exclusive file
    (`_lease.json.takeover`): the taker re-reads the lease, deletes it only if it is still the stale one it judged,
    and creates its own with the same atomic create, so two takers cannot both win. A second job refuses with the
    holder named; the same process may re-enter. Object stores offer no conditional put through pyarrow: there the
    lease is refused with a clear error (`--output-lease off` runs without one, for a single writer you control)."""

    def __init__(self, output: str, timeout_s: float = 120.0, mode: str = "exclusive"):
        self.output, self.timeout_s, self.mode = output, timeout_s, mode
        self.path = storage.join(output, "_lease.json")
        self.takeover_path = storage.join(output, "_lease.json.takeover")
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "run_id": hashlib.sha256(f"{output}|{os.getpid()}|{time.time_ns()}".encode()).hexdigest()[:12]}
        self._stop = None
        self.lost = False  # set by the heartbeat when another job holds the file (we were judged stale)

    def _read(self) -> Optional[dict]:
        try:
            return json.loads(storage.read_bytes(self.path))
        except (SubqError, ValueError):
            return None

    def _stale(self, info: dict) -> bool:
        if time.time() - float(info.get("heartbeat", 0)) > self.timeout_s:
            return True
        if info.get("host") == self.me["host"]:
            try:
                os.kill(int(info["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, KeyError):
                pass
        return False

    def _data(self) -> bytes:
        return json.dumps({**self.me, "heartbeat": time.time()}).encode()

    def _write(self) -> None:
        storage.write_bytes_atomic(self.path, self._data())

    def _refuse(self, info: dict):
        age = time.time() - float(info.get("heartbeat", 0))
        return SubqError(f"another job is writing this output (host {info.get('host')}, pid {info.get('pid')}, "
                         f"heartbeat {age:.0f}s ago)", source=self.output,
                         hint=f"wait for it to finish, or delete {self.path} if that job is gone")

    def _take_over(self, judged: dict) -> bool:
        """Replace the stale lease `judged` by ours; True when ours is now the lease."""
        if not storage.create_exclusive(self.takeover_path, self._data()):
            try:  # a taker that died mid-takeover leaves its file: stale after timeout_s
                t = json.loads(storage.read_bytes(self.takeover_path))
                if time.time() - float(t.get("heartbeat", 0)) > self.timeout_s:
                    storage.delete(self.takeover_path)
            except (SubqError, ValueError):
                pass
            return False
        try:
            now = self._read()
            if now is not None and (now.get("run_id"), now.get("heartbeat")) != (judged.get("run_id"),
                                                                                 judged.get("heartbeat")):
                return False  # it changed since we judged it: not ours to delete
            storage.delete(self.path)
            return storage.create_exclusive(self.path, self._data())
        finally:
            storage.delete(self.takeover_path)

    def acquire(self) -> "OutputLease":
        import threading

        if self.mode == "off":
            return self
        storage.makedirs(self.output)
        try:
            got = storage.create_exclusive(self.path, self._data())
        except storage.NoAtomicCreate as e:
            raise ConfigError(f"the output's store offers no atomic create (conditional put), so two jobs could "
                              f"both take its lease: {e}", field="output_lease", source=self.output,
                              hint="write to a local or mounted path, or pass --output-lease off if you make sure "
                                   "only one job writes this output") from None
        for _ in range(20):
            if got:
                break
            info = self._read()
            if info is None:  # removed between our create and our read (a release): try again
                got = storage.create_exclusive(self.path, self._data())
                continue
            if info.get("host") == self.me["host"] and info.get("pid") == self.me["pid"]:
                self.me["run_id"] = info.get("run_id", self.me["run_id"])  # the same process re-enters
                self._write()
                got = True
                break
            if not self._stale(info):
                raise self._refuse(info)
            got = self._take_over(info)
            if not got:
                time.sleep(0.05)
        if not got:
            raise SubqError("another job took this output's lease at the same moment", source=self.output)
        self._stop = threading.Event()
        stop = self._stop

        def beat():
            while not stop.wait(self.timeout_s / 4):
                try:
                    info = self._read()
                    if info is not None and info.get("run_id") != self.me["run_id"]:
                        self.lost = True  # another job took it over: never overwrite its lease
                        return
                    self._write()
                except Exception:  # a transient storage error: the next beat tries again
                    pass

        threading.Thread(target=beat, name="subq-lease", daemon=True).start()
        return self

    def release(self) -> None:
        if self._stop is None:
            return
        self._stop.set()
        self._stop = None
        info = self._read()
        if info is not None and info.get("run_id") == self.me["run_id"]:
            storage.delete(self.path)

    def __enter__(self) -> "OutputLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def report_failures(c: dict, reasons, pending: int, where: str) -> None:
    """Some problems failed: exit 0 with the count, where the reasons are and the 3 most common on the terminal.
    Every problem of this run failed: SubqError (exit 2) naming the most common cause."""
    from subq import console

    if not c["failed"]:
        return
    top = reasons.most_common(3)
    if c["rows"] == 0 and not c["budget"] and not c["stopped"]:
        raise SubqError(f"all {c['failed']} problems of this run failed; most common reason ({top[0][1]}x): "
                        f"{top[0][0]}", hint=f"reasons in {where}; --retry-failed retries them")
    console.echo(f"{c['failed']} of {pending} problems failed; reasons in {where} (--retry-failed retries them). "
                 "Most common:")
    for reason, n in top:
        console.echo(f"  {n} x {reason}")


def run_generate(config: GenerateConfig | dict) -> dict:
    """Run (or resume) a generation job; returns the summary dict (also written to OUTPUT/summary.json). Holds
    OUTPUT's lease while it writes."""
    cfg = config if isinstance(config, GenerateConfig) else load_config(GenerateConfig, None, config)
    lease = OutputLease(cfg.output, cfg.lease_timeout_s, cfg.output_lease)
    try:
        return _run_generate(cfg, lease)
    finally:
        lease.release()


def _run_generate(cfg: GenerateConfig, lease: OutputLease) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc

    from subq.problems import load_problem_table, problems_from_table

    prices = cfg.prices()
    # a pyarrow table, not an object per problem: resuming a million problems builds objects only for the pending
    table = load_problem_table(cfg.input, cfg.limit)  # DataError before anything is written
    if pc.count_distinct(table.column("problem_id")).as_py() != table.num_rows:  # the same problem twice: keep the first
        seen, keep = set(), []
        for pid in table.column("problem_id").to_pylist():
            keep.append(pid not in seen)
            seen.add(pid)
        table = table.filter(keep)
    n_problems = table.num_rows
    if not cfg.dry_run and not cfg.cancel and not os.environ.get(cfg.api_key_env):
        raise ConfigError(f"environment variable {cfg.api_key_env} is not set", field="api_key_env",
                          hint="export the key (any non-empty value for a local server)")
    if not cfg.cancel:
        check_manifest(cfg)  # drift: refused before anything is written or sent
    if not cfg.dry_run and not cfg.cancel:
        lease.acquire()  # another live job on this output: refused here
        for sub in ("", "parts", "failures"):  # temps of writers killed earlier (we hold the lease: none is live)
            storage.sweep_temps(storage.join(cfg.output, sub) if sub else cfg.output, recursive=False)
    done = done_ids(cfg.output)
    fails = read_failures(cfg.output, done)
    ids = table.column("problem_id")
    has_row = pc.is_in(ids, value_set=done)
    failed = pc.is_in(ids, value_set=pa.array(list(fails), pa.string()))
    if cfg.retry_failed:
        mask = pc.and_(failed, pc.invert(has_row))
    else:
        mask = pc.invert(pc.or_(has_row, failed))
    pending = problems_from_table(table.filter(mask), str(cfg.input))
    del table, done, ids
    if cfg.dry_run:
        from pipelines.batch import batch_estimate

        est = estimate(cfg, pending, prices)
        return {**est, **batch_estimate(est, prices, cfg.model), "api": cfg.api,
                "already_done": n_problems - len(pending)}
    if not os.environ.get(cfg.api_key_env):
        raise ConfigError(f"environment variable {cfg.api_key_env} is not set", field="api_key_env",
                          hint="export the key (any non-empty value for a local server)")
    if cfg.cancel:
        from pipelines.batch import cancel_batches

        lease.acquire()  # a live job on this output would send again what --cancel stops: stop it first
        return cancel_batches(cfg, prices)
    if pending and cfg.api == "online":
        from actors.teacher import check_endpoint

        check_endpoint(cfg.base_url)  # nothing answers there: one error line now, not a run of failures
    storage.makedirs(cfg.output)
    write_manifest(cfg)
    storage.write_bytes_atomic(storage.join(cfg.output, "config.yaml"),
                               __import__("yaml").safe_dump(cfg.model_dump(mode="json"), sort_keys=False).encode())
    t0 = time.time()
    progress = Progress(len(pending), cfg.progress_interval_s)
    fatal = None
    limiter_stats = None
    interrupted = None  # the KeyboardInterrupt (Ctrl-C) or subq.stop.Terminated (SIGTERM) that stopped the run
    if pending:
        try:
            if cfg.api == "batch":
                from pipelines.batch import run_batch

                fatal, limiter_stats = run_batch(cfg, pending, prices, progress)
            else:
                fatal, limiter_stats = _run_pipeline(cfg, pending, prices, progress)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: keep what is finished, export it, stop; re-run to resume
            interrupted = e
    progress.print()
    exp = export(cfg.output)
    el = time.time() - t0
    c = progress.c
    stopped = "fatal" if fatal else "interrupted" if interrupted is not None else "budget" if c["budget"] else None
    summary = {
        "output": cfg.output, "input": cfg.input, "model": cfg.model, "problems": n_problems,
        "pending_at_start": len(pending), "rows_total": exp["rows"], "failures_open": exp["failures"],
        "not_done": n_problems - exp["rows"] - exp["failures"],
        "this_run": {"rows": c["rows"], "failed": c["failed"], "skipped_budget": c["budget"],
                     "calls": c["calls"], "cache_hits": c["cached"], "requests_sent": c["attempts"],
                     "n_429": c["n_429"], "prompt_tokens": c["new_prompt_tokens"],
                     "completion_tokens": c["new_completion_tokens"], "cost_usd": round(c["new_cost_usd"] + c["maybe_billed_usd"], 6),
                     # calls that may have been billed without a reply (timeout after send, dropped connection,
                     # unreadable 200): charged at their hold estimate, included in cost_usd
                     "maybe_billed": c["maybe_billed"], "maybe_billed_usd": round(c["maybe_billed_usd"], 6),
                     "by_stage": {st: {k: round(c[f"{st}_{k}"], 6) for k in ("prompt_tokens", "completion_tokens",
                                                                              "cost_usd")}
                                  for st in ("qg", "qa", "feedback")},
                     "actors_used": len(progress.actors), "elapsed_s": round(el, 2), "req_per_s": round(c["attempts"] / el, 3) if el else None},
        "stopped": stopped, "api": cfg.api, "batch": (limiter_stats or {}).pop("batch", None),
        "limiter": limiter_stats, "paths": exp["paths"],
    }
    storage.write_bytes_atomic(storage.join(cfg.output, "summary.json"), json.dumps(summary, indent=2).encode())
    if fatal:
        raise fatal
    if interrupted is None:
        report_failures(c, progress.reasons, len(pending), exp["paths"]["failures"])
    if interrupted is not None:
        from subq import console

        console.emit_json(summary)
        raise interrupted  # exit 130 (Ctrl-C) or 143 (SIGTERM): subq.cli_options.run
    return summary


def _run_pipeline(cfg: GenerateConfig, pending, prices, progress: Progress):
    import ray

    from actors.limiter import RateLimiter, get_or_create_limiter, limiter_name
    from cluster.connect import init_ray, schedulable

    started = False
    if not ray.is_initialized():
        kw = {"include_dashboard": False, "log_to_driver": False}
        if cfg.ray_address is None and not os.environ.get("RAY_ADDRESS") and cfg.ray_num_cpus:
            kw["num_cpus"] = cfg.ray_num_cpus
        init_ray(cfg.ray_address, namespace="subq", **kw)
        started = True
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    try:
        lname = None
        limiter = None
        run_id = hashlib.sha256(f"{cfg.output}|{time.time()}".encode()).hexdigest()[:12]
        owner = f"generate:{socket.gethostname()}:{os.getpid()}:{run_id}"
        # always a limiter: without --rpm/--tpm it learns them from the provider's x-ratelimit-limit-* headers
        from actors.limiter import account_id
        from subq import console

        # one detached limiter per (endpoint, model, account), shared with every other job and Serve replica
        lname = limiter_name(cfg.base_url, cfg.model, account_id(os.environ.get(cfg.api_key_env)))
        limiter = get_or_create_limiter(lname)
        reg = ray.get(limiter.register.remote(owner, cfg.rpm, cfg.tpm, cfg.max_retry_after_s)) \
            if cfg.rpm or cfg.tpm else {"conflict": None}
        if reg["conflict"]:
            console.echo(f"warning: limiter {lname}: {reg['conflict']}")

        def limiter_status() -> str:
            st = ray.get(limiter.stats.remote(), timeout=5)
            if st["blocked_for_s"] > 5:
                capped = f" (Retry-After {st['longest_retry_after_s']:.0f}s capped to {st['max_retry_after_s']:.0f}s)" \
                    if st["retry_after_capped"] else ""
                return f"provider backoff {st['blocked_for_s']:.0f}s{capped}"
            return ""

        progress.status_fn = limiter_status
        bname, budget = None, None
        if cfg.max_cost_usd is not None:
            bname = f"subq-budget:{run_id}"
            # pinned to the driver's node and never restarted: a restart would forget what was spent
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
            budget = ray.remote(RateLimiter).options(name=bname, namespace="subq", num_cpus=0, max_concurrency=1000,
                                                     scheduling_strategy=here).remote(None, None, 0.0, cfg.max_cost_usd)
        client_kwargs = dict(model=cfg.model, base_url=cfg.base_url, api_key_env=cfg.api_key_env,
                             max_retries=cfg.max_retries, backoff_initial_s=cfg.backoff_initial_s,
                             backoff_max_s=cfg.backoff_max_s, timeout_s=cfg.timeout_s, price=prices.price(cfg.model),
                             cache_dir=storage.join(cfg.output, "cache"), max_concurrency=cfg.max_concurrency,
                             max_resamples=cfg.max_resamples, max_retry_after_s=cfg.max_retry_after_s,
                             rpm=cfg.rpm, tpm=cfg.tpm)
        job = dict(template=cfg.template, n_sets=cfg.n_sets, n_feedback=cfg.n_feedback, temperature=cfg.temperature,
                   max_tokens=cfg.max_tokens, model=cfg.model, output=cfg.output)
        items = [dict(problem_id=p.problem_id, problem=p.problem, gold_answer=p.gold_answer, source=p.source,
                      source_index=p.index) for p in pending]
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / cfg.batch_size)))
        pool = ray.data.ActorPoolStrategy(min_size=cfg.actors[0], max_size=cfg.actors[1])
        ds = ds.map_batches(GenerateActor, batch_size=cfg.batch_size, compute=pool,
                            num_cpus=cfg.actor_num_cpus, resources=schedulable(cfg.actor_resources),
                            fn_constructor_kwargs=dict(
                                client_kwargs=client_kwargs, limiter_name=lname, budget_name=bname, job=job,
                                api_key_ref=[ray.put(os.environ[cfg.api_key_env])]))
        fatal = None
        from subq import stop

        for batch in ds.iter_batches(batch_size=None, batch_format="default"):
            stop.check()  # a Ctrl-C/SIGTERM swallowed on its way (e.g. in a finalizer) still stops here (subq.stop)
            b = {k: [x.item() if hasattr(x, "item") else x for x in v] for k, v in batch.items()}
            progress.add(b)
            for status, err in zip(b["status"], b["error"]):
                if status == "fatal" and fatal is None:
                    fatal = SubqError(err)
        lstats = None
        if limiter is not None:
            lstats = ray.get(limiter.stats.remote())
            ray.get(limiter.unregister.remote(owner))  # our limits stop counting; the limiter stays for others
        bstats = None
        if budget is not None:
            b = ray.get(budget.stats.remote())
            bstats = {"spent_usd": b["spent_usd"], "budget_usd": b["budget_usd"]}
            ray.kill(budget)
        return fatal, {"rate": lstats, "budget": bstats}
    finally:
        # the limiter's status reads Ray: after the shutdown a progress line would start a whole new local Ray
        # (ray's auto-init), 20-30 s at the end of every run and after every Ctrl-C/SIGTERM
        progress.status_fn = None
        if started:
            ray.shutdown()
