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
      batch/state.json             --api batch only (pipelines/generate/batch.py): each request shard's file id and batch id,
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
import contextlib
import hashlib
import json
import math
import os
import socket
import time
from typing import Optional

from actors.teacher import (TeacherActor, TeacherAuthError, TeacherBudgetExceeded, TeacherError,
                            TeacherRequestError, TeacherStopped)
from pipelines.generate_config import GenerateConfig  # noqa: F401  (the job's config, defined once there)
from subq import storage
from subq.config import load_config
from pipelines.generate.output import (
    FAILURE_SCHEMA, OutputLease, _part_name, _write_table, check_manifest, done_ids, export, read_failures,
    write_manifest,
)
from subq.errors import ConfigError, SubqError
from subq.recipe import build_row, build_set, calls_after_qg, release_gold, split_qg, validators



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
        v_qg, v_qa, v_fb = validators(fam)
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




def estimate(cfg: GenerateConfig, problems, prices) -> dict:
    """Dry-run estimate: calls, prompt tokens (rendered prompts), completion tokens (typical and upper bound), $ online
    and at the Batch API's price."""
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
    f = price.batch_factor  # the same calls through the Batch API (--api batch)
    return {"dry_run": True, "problems": len(problems), "calls": calls, "prompt_tokens": prompt,
            "completion_tokens_typical": typical, "completion_tokens_max": upper,
            "cost_usd_typical": round(price.cost(prompt, typical), 6), "cost_usd_max": round(price.cost(prompt, upper), 6),
            "cost_usd_typical_batch": round(price.cost(prompt, typical) * f, 6),
            "cost_usd_max_batch": round(price.cost(prompt, upper) * f, 6), "batch_factor": f,
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
        return {**estimate(cfg, pending, prices), "api": cfg.api, "already_done": n_problems - len(pending)}
    if not os.environ.get(cfg.api_key_env):
        raise ConfigError(f"environment variable {cfg.api_key_env} is not set", field="api_key_env",
                          hint="export the key (any non-empty value for a local server)")
    if cfg.cancel:
        from pipelines.generate.batch import cancel_batches

        lease.acquire()  # a live job on this output would send again what --cancel stops: stop it first
        return cancel_batches(cfg, prices)
    if pending and cfg.api == "online":
        from actors.cache import check_endpoint

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
                from pipelines.generate.batch import run_batch

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

    from actors.limiter import RateLimiter
    from actors.limiter_client import OwnerLease, limiter_name
    from cluster.connect import ray_session, schedulable
    from cluster.submit import share_key

    session = contextlib.ExitStack()  # Ray for this job (cluster.connect.ray_session), left at the very end
    session.enter_context(ray_session(cfg.ray_address, namespace="subq", include_dashboard=False, log_to_driver=False,
                                      **({"num_cpus": cfg.ray_num_cpus} if cfg.ray_num_cpus else {})))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    limits_lease = None
    try:
        lname = None
        limiter = None
        run_id = hashlib.sha256(f"{cfg.output}|{time.time()}".encode()).hexdigest()[:12]
        owner = f"generate:{socket.gethostname()}:{os.getpid()}:{run_id}"
        # always a limiter: without --rpm/--tpm it learns them from the provider's x-ratelimit-limit-* headers
        from actors.limiter_client import account_id
        from subq import console

        # one detached limiter per (endpoint, model, account), shared with every other job and Serve replica
        lname = limiter_name(cfg.base_url, cfg.model, account_id(os.environ.get(cfg.api_key_env)))
        # our limits, registered now and renewed while we run (also on a limiter re-created after a loss)
        limits_lease = OwnerLease(lname, owner, cfg.rpm, cfg.tpm, cfg.max_retry_after_s)
        limiter = limits_lease.actor
        if limits_lease.conflict:
            console.echo(f"warning: limiter {lname}: {limits_lease.conflict}")

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
        out = storage.absolute(cfg.output)  # the actors on a joined cluster do not run in this working directory
        client_kwargs = dict(cfg.client_kwargs(), cache_dir=storage.join(out, "cache"),
                             max_concurrency=cfg.max_concurrency, max_resamples=cfg.max_resamples, limits_owner=owner)
        job = dict(template=cfg.template, n_sets=cfg.n_sets, n_feedback=cfg.n_feedback, temperature=cfg.temperature,
                   max_tokens=cfg.max_tokens, model=cfg.model, output=out)
        items = [dict(problem_id=p.problem_id, problem=p.problem, gold_answer=p.gold_answer, source=p.source,
                      source_index=p.index) for p in pending]
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / cfg.batch_size)))
        pool = ray.data.ActorPoolStrategy(min_size=cfg.actors[0], max_size=cfg.actors[1])
        ds = ds.map_batches(GenerateActor, batch_size=cfg.batch_size, compute=pool,
                            num_cpus=cfg.actor_num_cpus, resources=schedulable(cfg.actor_resources),
                            fn_constructor_kwargs=dict(
                                client_kwargs=client_kwargs, limiter_name=lname, budget_name=bname, job=job,
                                api_key_ref=share_key(cfg.api_key_env)))
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
            lstats = ray.get(limits_lease.actor.stats.remote())
            lstats.pop("owners", None)  # other jobs' names are not this run's summary
            limits_lease.close()  # our limits stop counting; the limiter stays for others
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
        if limits_lease is not None:
            limits_lease.close()  # also on a failure or a stop: no renewals of a job that is over
        session.close()
