"""`subq generate --api batch`: the same rows through the provider's Batch API, at the batch price.

    subq generate --api batch --input gsm8k:train --output out/gen --model gpt-4o-mini       # submit, wait, collect
    subq generate --api batch --output out/gen --dry-run      # estimate at online AND batch prices
    subq generate --api batch --output out/gen --cancel       # cancel what this output has in flight

Rounds. A set's QA and feedback prompts need only the problem and the set's sub-questions (pipelines.generate
`calls_after_qg`), so the three stages run as two dependent rounds of batches: QG for every pending problem,
then QA + feedback for the sets that came back. Each round writes the requests as JSONL shards
(`custom_id` = `PROBLEM_ID|STAGE|SET|SAMPLE`, at most `batch_max_requests` lines and `batch_max_bytes` bytes a
shard), uploads them (`files.create(purpose="batch")`; the SDK retries failed uploads), creates batches
(`/v1/chat/completions`, `completion_window="24h"`) keeping at most `batch_max_in_flight` running, polls them
every `batch_poll_s`, downloads output and error files, and writes every good reply into the SAME request cache
as online calls (`cache/`, key `actors.teacher.cache_key`), priced at the batch price (`Price.batch()`). Rows are
then built by the online code (`split_qg`, `build_set`, `build_row`) and written as the same Parquet parts and
failures, so exports, `--retry-failed` (online or batch) and training read them unchanged.

Durable across driver loss: `OUTPUT/batch/state.json` (atomic writes) records each shard's request file, then
its file id as soon as the upload returns, then its batch id as soon as the batch exists, then its status and
per-request errors once collected. A re-run reads it and picks up batches still in progress instead of paying
for them again; a batch created just before the driver died (id not yet written) is found again through its
`metadata.subq_shard` in `batches.list`. Terminal batches: `completed` -> collected; `expired`, `failed`,
`cancelled` -> collected for what they answered, and only the requests without a result are resubmitted (at most
`batch_max_submissions` times each in one run, then a recorded failure; `--retry-failed` starts the count again,
so it resubmits exactly the requests of the failed problems that have no result). A shard an earlier run wrote but
never submitted is submitted only if every request in it is still wanted (this run's problems, not cached);
otherwise it is dropped (`status: dropped`) and the wanted requests go into new shards, so a re-run never buys a
cached request or one of a problem outside the run. Spend (`summary.json`, `cost_usd_batch`, the budget) counts
every billed reply: each 200 in an output file, including replies that fail validation and are sent again.
Per-request errors (the error file) become
recorded failures of their problem. A missing or malformed output file is reported with its batch id; every
line that parses is kept and only the requests without a result are sent again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from typing import Optional

from actors.cache import RequestCache, cache_key, normalize_endpoint
from subq import console, stop, storage
from subq.costs import estimate_tokens
from subq.errors import ConfigError, SubqError

ENDPOINT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")
NOT_RUN = ("batch_expired", "batch_cancelled")  # error-file codes of requests the provider never ran


def custom_id(problem_id: str, stage: str, set_index: int, sample: int) -> str:
    return f"{problem_id}|{stage}|{set_index}|{sample}"


class BatchDriver:
    """One output directory's batches: the state file, the OpenAI client, the rounds."""

    def __init__(self, cfg, prices):
        import openai

        self.cfg = cfg
        self.price = prices.price(cfg.model)
        self.bprice = self.price.batch()
        self.key = __import__("os").environ.get(cfg.api_key_env) or ""
        self.base_url = cfg.base_url or "https://api.openai.com/v1"
        self.client = openai.OpenAI(base_url=cfg.base_url, api_key=self.key, max_retries=cfg.max_retries,
                                    timeout=cfg.timeout_s)
        self.cache = RequestCache(storage.join(cfg.output, "cache"))
        self.state_path = storage.join(cfg.output, "batch", "state.json")
        self.run_tag = hashlib.sha256(str(cfg.output).encode()).hexdigest()[:16]
        self.resumed = storage.exists(self.state_path)
        self.state = self._load_state()
        self.done: set[str] = set()  # cache keys with a reply
        self.fresh: dict[str, dict] = {}  # cache entries written by this run
        self.errors: dict[str, str] = {}  # custom_id -> reason (per-request errors)
        self.output_errors: list[str] = []
        self.budget_hit = False  # --max-cost-usd stopped submissions
        self.invalid: dict[str, str] = {}  # custom_id -> why its last reply was unusable (sent again)
        # what the provider bills this run: every reply with status 200 collected, usable or not (invalid QG
        # replies sent again, unusable bodies), by (batch id, custom_id) so a batch read twice is counted once:
        # {"pid", "stage", "prompt_tokens", "completion_tokens", "cost_usd"} at the batch price
        self.billed: dict[tuple[str, str], dict] = {}
        self._adoptable: Optional[dict] = None
        self._files: Optional[dict] = None
        self._specs: dict[str, dict] = {}
        self.last_line = 0.0
        from subq.recipe import validators

        self.v_qg, self.v_qa, self.v_fb = validators(cfg.template)

    def reason(self, r: dict, text: str) -> Optional[str]:
        """Why a reply is unusable (None: usable), with the online path's validators."""
        if r["stage"] == "qg":
            return self.v_qg(text)
        return self.v_qa(text) if r["stage"] == "qa" else self.v_fb(r["nq"])(text)

    # ------------------------------------------------------------------ state
    def _load_state(self) -> dict:
        if storage.exists(self.state_path):
            try:
                return json.loads(storage.read_bytes(self.state_path))
            except ValueError as e:
                raise SubqError(f"cannot read the batch state file: {e}", source=self.state_path) from e
        return {"version": 1, "created": time.time(), "shards": {}}

    def save(self) -> None:
        storage.write_bytes_atomic(self.state_path, json.dumps(self.state, indent=1).encode())

    def _shard_specs(self, name: str) -> dict[str, dict]:
        """custom_id -> what a reply needs (cache key, template, sample, stage, number of sub-questions), read
        back from the shard's own request file: replies of a batch submitted by an earlier run (even for
        problems this run does not ask for) are cached too."""
        if name not in self._specs:
            from subq.prompts import parse_prompt, template_for

            specs = {}
            data = storage.read_bytes(storage.join(self.cfg.output, "batch", "requests", name + ".jsonl"))
            for raw in data.decode().splitlines():
                if not raw.strip():
                    continue
                line = json.loads(raw)
                pid, stage, _, sample = line["custom_id"].rsplit("|", 3)
                body, tid = line["body"], template_for(self.cfg.template, stage)
                nq = 0
                if stage == "feedback":
                    parsed = parse_prompt(body["messages"][-1]["content"])
                    nq = len(parsed[2] or []) if parsed else 0
                specs[line["custom_id"]] = {
                    "cid": line["custom_id"], "stage": stage, "tid": tid, "sample": int(sample), "nq": nq,
                    "est_usd": self.bprice.cost(sum(estimate_tokens(m.get("content") or "") for m in body["messages"]),
                                                int(body.get("max_tokens") or 0)),
                    "key": cache_key(body["model"], body["messages"], body.get("temperature"), body.get("max_tokens"),
                                     int(sample), tid, self.base_url)}
            self._specs[name] = specs
        return self._specs[name]

    # ------------------------------------------------------------------ provider calls
    def _api(self, what: str, fn, *args, **kwargs):
        import openai

        try:
            return fn(*args, **kwargs)
        except openai.APIStatusError as e:
            msg = str(getattr(e, "message", e))
            msg = msg.replace(self.key, "***") if len(self.key) >= 8 else msg
            raise SubqError(f"{what}: HTTP {e.status_code}: {msg[:300]}", source=self.base_url) from None
        except openai.APIConnectionError as e:
            raise SubqError(f"{what}: cannot reach the endpoint ({type(e).__name__})", source=self.base_url) from None

    def check_support(self) -> None:
        """A clear error, before any upload, when the endpoint has no Batch API."""
        import openai

        try:
            self.client.batches.list(limit=1)
        except openai.APIStatusError as e:
            if e.status_code in (404, 405, 501):
                raise ConfigError(f"the endpoint {self.base_url} has no Batch API (GET /batches answered "
                                  f"{e.status_code}); nothing was uploaded", field="api",
                                  hint="use --api online for this endpoint") from None
            err = e
            self._api("checking the Batch API", lambda: (_ for _ in ()).throw(err))
        except openai.APIConnectionError as e:
            raise SubqError(f"cannot reach the endpoint ({type(e).__name__})", source=self.base_url) from None

    def _adopt_file(self, name: str) -> Optional[str]:
        if self._files is None:
            self._files = {}
            if self.resumed:
                for f in self._api("listing files", self.client.files.list, purpose="batch"):
                    self._files.setdefault(f.filename, f.id)
        return self._files.get(name + ".jsonl")

    def _adopt(self, name: str) -> Optional[str]:
        """The id of a batch created for shard `name` whose id never reached the state file (driver killed)."""
        if self._adoptable is None:
            self._adoptable = {}
            if not self.resumed:  # a first run has nothing to find
                return None
            since = self.state.get("created", 0) - 3600
            for b in self._api("listing batches", self.client.batches.list, limit=100):
                if b.created_at < since:
                    break
                meta = b.metadata or {}
                if meta.get("subq_run") == self.run_tag and meta.get("subq_shard"):
                    self._adoptable.setdefault(meta["subq_shard"], b.id)
        return self._adoptable.get(name)

    # ------------------------------------------------------------------ requests
    def request(self, pid: str, stage: str, set_index: int, tid: str, sample: int, msgs: list, nq: int = 0) -> dict:
        c = self.cfg
        key = cache_key(c.model, msgs, c.temperature, c.max_tokens, sample, tid, self.base_url)  # = online's key
        return {"cid": custom_id(pid, stage, set_index, sample), "key": key, "tid": tid, "sample": sample,
                "stage": stage, "pid": pid, "nq": nq,
                "line": {"custom_id": custom_id(pid, stage, set_index, sample), "method": "POST", "url": ENDPOINT,
                         "body": {"model": c.model, "messages": msgs, "temperature": c.temperature,
                                  "max_tokens": c.max_tokens}}}

    def _make_shards(self, rnd: str, todo: list[dict]) -> None:
        c = self.cfg
        chunks, cur, size = [], [], 0
        for r in todo:
            line = (json.dumps(r["line"], ensure_ascii=False) + "\n").encode()
            if cur and (len(cur) >= c.batch_max_requests or size + len(line) > c.batch_max_bytes):
                chunks.append(cur)
                cur, size = [], 0
            cur.append(line)
            size += len(line)
        if cur:
            chunks.append(cur)
        for chunk in chunks:
            data = b"".join(chunk)
            name = f"{rnd}-{len(self.state['shards']):04d}-{hashlib.sha256(data).hexdigest()[:10]}"
            storage.write_bytes_atomic(storage.join(c.output, "batch", "requests", name + ".jsonl"), data)
            self.state["shards"][name] = {"round": rnd, "requests": len(chunk), "bytes": len(data), "file_id": None,
                                          "batch_id": None, "status": "pending", "collected": False,
                                          "request_errors": {}}
            self.save()

    def _affordable(self, name: str) -> bool:
        """--max-cost-usd: this run's spend + the upper bound (max_tokens replies) of the batches it has running
        + this shard's upper bound must fit; otherwise nothing more is submitted (stopped: budget)."""
        if self.cfg.max_cost_usd is None:
            return True
        bound = lambda n: sum(x["est_usd"] for x in self._shard_specs(n).values())  # noqa: E731
        running = sum(bound(n) for n, s in self.state["shards"].items() if s.get("batch_id") and not s["collected"])
        spent = self.spent()
        if spent + running + bound(name) <= self.cfg.max_cost_usd:
            return True
        self.budget_hit = True
        return False

    def _submit(self, name: str) -> None:
        s = self.state["shards"][name]
        if s["file_id"] is None:  # an upload whose id never reached the state file (driver killed) is re-used
            s["file_id"] = self._adopt_file(name)
        if s["file_id"] is None:
            data = storage.read_bytes(storage.join(self.cfg.output, "batch", "requests", name + ".jsonl"))
            f = self._api(f"uploading {name}", self.client.files.create, file=(name + ".jsonl", data),
                          purpose="batch")
            s["file_id"] = f.id
            self.save()
        bid = self._adopt(name)
        if bid is None:
            b = self._api(f"creating the batch for {name}", self.client.batches.create, input_file_id=s["file_id"],
                          endpoint=ENDPOINT, completion_window="24h",
                          metadata={"subq_run": self.run_tag, "subq_shard": name})
            bid = b.id
        s["batch_id"], s["status"], s["submitted_at"] = bid, "submitted", time.time()
        self.save()

    # ------------------------------------------------------------------ results
    def _download(self, bid: str, file_id: Optional[str], what: str):
        """Stream the records of an output/error file (memory stays flat for a 200 MB file); a file that cannot
        be downloaded or has malformed lines is reported with the batch id, every good line is kept."""
        import openai

        if not file_id:
            return
        good = bad = 0
        try:
            with self.client.files.with_streaming_response.content(file_id) as resp:
                for line in resp.iter_lines():
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                        if not isinstance(rec, dict) or "custom_id" not in rec:
                            raise ValueError
                    except ValueError:
                        bad += 1
                        continue
                    good += 1
                    yield rec
        except openai.APIStatusError as e:
            self.output_errors.append(f"batch {bid}: {what} file {file_id} could not be downloaded "
                                      f"(HTTP {e.status_code}); its requests without a result are sent again")
            return
        if bad:
            self.output_errors.append(f"batch {bid}: {what} file {file_id} has {bad} malformed line(s); "
                                      f"{good} parsed and kept, requests without a result are sent again")

    def _bill(self, bid: str, r: dict, body) -> None:
        """A 200 reply is billed whatever it holds: count its usage (the body's own `usage`)."""
        usage = (body.get("usage") if isinstance(body, dict) else None) or {}
        try:
            pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        except (TypeError, ValueError, AttributeError):
            pt = ct = 0
        pid = r["cid"].rsplit("|", 3)[0]
        self.billed[(bid, r["cid"])] = {"pid": pid, "stage": r["stage"], "prompt_tokens": pt,
                                       "completion_tokens": ct, "cost_usd": self.bprice.cost(pt, ct),
                                       "online_cost_usd": self.price.cost(pt, ct)}

    def spent(self) -> float:
        return sum(e["cost_usd"] for e in self.billed.values())

    def _collect(self, name: str, b) -> None:
        from concurrent.futures import ThreadPoolExecutor

        s = self.state["shards"][name]
        by_cid = self._shard_specs(name)
        n_before = len(self.output_errors)
        with ThreadPoolExecutor(16) as pool:  # cache writes are small fsynced files: write them in parallel
            pending = []
            for rec in self._download(b.id, b.output_file_id, "output"):
                r = by_cid.get(rec["custom_id"])
                resp = rec.get("response") or {}
                if r is None:
                    continue
                if resp.get("status_code") != 200:
                    s["request_errors"][r["cid"]] = f"batch {b.id}: HTTP {resp.get('status_code')}"
                    continue
                self._bill(b.id, r, resp.get("body"))
                try:
                    body = resp["body"]
                    text = body["choices"][0]["message"]["content"]
                    usage = body.get("usage") or {}
                    if text is None:
                        raise TypeError("no message content")
                except (KeyError, IndexError, TypeError) as e:
                    s["request_errors"][r["cid"]] = f"batch {b.id}: unusable reply ({type(e).__name__})"
                    continue
                reason = self.reason(r, text)
                if reason and r["stage"] == "qg":  # online re-samples these: here the request is sent again
                    self.invalid[r["cid"]] = reason
                    continue
                pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
                entry = {"text": text, "prompt_tokens": pt, "completion_tokens": ct,
                         "cost_usd": self.bprice.cost(pt, ct), "key": r["key"], "model": self.cfg.model,
                         "provenance": body.get("system_fingerprint"), "invalid_reason": reason, "n_429": 0,
                         "template_id": r["tid"], "sample_index": r["sample"], "created": time.time(),
                         "endpoint": normalize_endpoint(self.base_url), "batch_id": b.id,
                         "online_cost_usd": self.price.cost(pt, ct)}
                pending.append(pool.submit(self.cache.put, r["key"], entry))
                self.fresh[r["key"]] = entry
            for f in pending:
                f.result()
        self.done.update(k for k, e in self.fresh.items() if e["batch_id"] == b.id)
        for rec in self._download(b.id, b.error_file_id, "error"):
            r = by_cid.get(rec["custom_id"])
            if r is None or r["key"] in self.done:
                continue
            err = rec.get("error") or {}
            if err.get("code") in NOT_RUN:
                continue  # never ran: sent again
            resp = rec.get("response") or {}
            body = resp.get("body") or {}
            msg = (body.get("error") or {}).get("message") or err.get("message") or ""
            status = resp.get("status_code")
            s["request_errors"][r["cid"]] = f"batch {b.id}: HTTP {status}: {str(msg)[:200]}"
        if b.status == "failed" and b.errors:
            data = [getattr(x, "message", str(x)) for x in (b.errors.data or [])][:3]
            self.output_errors.append(f"batch {b.id} failed: {'; '.join(map(str, data))}")
        for m in self.output_errors[n_before:]:
            console.echo(f"warning: {m}")
        self.errors.update(s["request_errors"])
        counts = b.request_counts
        s.update(status=b.status, collected=True, output_file_id=b.output_file_id, error_file_id=b.error_file_id,
                 counts=counts.model_dump() if counts is not None else None)
        self.save()

    # ------------------------------------------------------------------ one round
    def _prune(self, rnd: str, reqs: list[dict]) -> None:
        """Shards an earlier run wrote but never submitted: submit one only if every request in it is still
        wanted (this run's, not cached, not failed); otherwise drop it (its wanted requests go into new shards).
        A shard whose batch was created but whose id never reached the state file is adopted, never dropped."""
        wanted = {r["cid"] for r in reqs if r["key"] not in self.done and r["cid"] not in self.errors}
        for name, s in self.state["shards"].items():
            if s["round"] != rnd or s["collected"] or s.get("batch_id"):
                continue
            bid = self._adopt(name)
            if bid is not None:
                s["batch_id"], s["status"], s["submitted_at"] = bid, "submitted", time.time()
                self.save()
                continue
            specs = self._shard_specs(name)
            if all(cid in wanted and spec["key"] not in self.done for cid, spec in specs.items()):
                continue
            s.update(status="dropped", collected=True, dropped_at=time.time(),
                     note="not submitted: holds cached requests or problems outside the run that resumed it")
            self.save()

    def run_round(self, rnd: str, reqs: list[dict]) -> None:
        # submissions of THIS run only: --retry-failed (or a later run) may resubmit what an earlier run gave up on
        tries = Counter()
        self._prune(rnd, reqs)
        while True:
            stop.check()  # a Ctrl-C/SIGTERM whose exception was swallowed on its way still ends the loop (subq.stop)
            shards = {n: s for n, s in self.state["shards"].items() if s["round"] == rnd}
            covered = set()
            for n, s in shards.items():
                if not s["collected"]:
                    covered.update(self._shard_specs(n))
            todo = []
            for r in reqs:
                if r["key"] in self.done or r["cid"] in self.errors or r["cid"] in covered:
                    continue
                if tries[r["cid"]] >= self.cfg.batch_max_submissions:
                    n = tries[r["cid"]]
                    self.errors[r["cid"]] = (
                        f"TeacherMalformedError: {n} replies failed validation: {self.invalid[r['cid']]}"
                        if r["cid"] in self.invalid else
                        f"BatchNotRun: no result after {n} batch submissions (expired, cancelled or failed batches)")
                    continue
                todo.append(r)
            if todo:
                self._make_shards(rnd, todo)
                for r in todo:
                    tries[r["cid"]] += 1
                continue
            open_ = [n for n, s in self.state["shards"].items() if s["round"] == rnd and not s["collected"]]
            if not open_:
                return
            running = [n for n in open_ if self.state["shards"][n]["batch_id"]]
            for n in open_:
                if len(running) >= self.cfg.batch_max_in_flight:
                    break
                if not self.state["shards"][n]["batch_id"]:
                    if not self._affordable(n):
                        break
                    self._submit(n)
                    running.append(n)
            if not running:  # what is left does not fit in --max-cost-usd: stop submitting
                return
            changed = False
            for n in running:
                s = self.state["shards"][n]
                b = self._api(f"polling batch {s['batch_id']}", self.client.batches.retrieve, s["batch_id"])
                if b.status != s["status"]:
                    s["status"] = b.status
                    changed = True
                if b.status in TERMINAL:
                    self._collect(n, b)
            self._progress_line(rnd)
            if not changed:
                stop.sleep(self.cfg.batch_poll_s)

    def _progress_line(self, rnd: str, force: bool = False) -> None:
        if not force and time.time() - self.last_line < self.cfg.progress_interval_s:
            return
        self.last_line = time.time()
        st = Counter(s["status"] for s in self.state["shards"].values() if s["round"] == rnd)
        console.echo(f"batch round {rnd}: " + ", ".join(f"{k} {v}" for k, v in sorted(st.items()))
                     + f" | replies {len(self.fresh)} | ${self.spent():.4f}")

    # ------------------------------------------------------------------ cancel
    def cancel(self) -> dict:
        """Cancel every batch of this output still in flight, then collect what they answered."""
        self.check_support()
        open_ = {n: s for n, s in self.state["shards"].items() if s.get("batch_id") and not s["collected"]
                 and s["status"] not in TERMINAL}
        for s in open_.values():
            self._api(f"cancelling batch {s['batch_id']}", self.client.batches.cancel, s["batch_id"])
            s["status"] = "cancelling"
        self.save()
        deadline = time.time() + max(60.0, 4 * self.cfg.batch_poll_s)
        final = {}
        while open_ and time.time() < deadline:
            for n, s in list(open_.items()):
                b = self._api(f"polling batch {s['batch_id']}", self.client.batches.retrieve, s["batch_id"])
                s["status"] = b.status
                if b.status in TERMINAL:
                    final[s["batch_id"]] = b.status
                    del open_[n]
            self.save()
            if open_:
                stop.sleep(min(self.cfg.batch_poll_s, 2.0))
        return {"cancelled": sorted(b for b, st in final.items() if st == "cancelled"),
                "finished_before_cancel": sorted(b for b, st in final.items() if st != "cancelled"),
                "still_cancelling": sorted(s["batch_id"] for s in open_.values()),
                "state": self.state_path,
                "note": "re-run the same command without --cancel to collect what they answered and resubmit the rest"}

    def summary(self) -> dict:
        shards = self.state["shards"].values()
        req = Counter()
        for s in shards:
            for k, v in (s.get("counts") or {}).items():
                req[k] += v or 0
        return {"batch_ids": [s["batch_id"] for s in shards if s.get("batch_id")],
                "batches_by_status": dict(Counter(s["status"] for s in shards)),
                "requests_per_status": {"total_submitted": req["total"], "completed": req["completed"],
                                        "failed": req["failed"],
                                        "not_run": req["total"] - req["completed"] - req["failed"]},
                "replies_this_run": len(self.fresh),
                # billed: every 200 reply collected by this run (invalid ones included), at the batch price
                "billed_replies_this_run": len(self.billed),
                "cost_usd_batch": round(self.spent(), 6),
                "cost_usd_online_equivalent": round(sum(e["online_cost_usd"] for e in self.billed.values()), 6),
                "output_errors": self.output_errors, "state": self.state_path}


# ------------------------------------------------------------------ the generation job


def run_batch(cfg, pending, prices, progress):
    """Generate rows for `pending` problems through the Batch API; returns (fatal error or None, extras) like
    pipelines.generate._run_pipeline, with extras["batch"] the summary's batch section."""
    import pyarrow as pa

    from pipelines.generate.output import FAILURE_SCHEMA, _part_name, _write_table
    from subq.recipe import build_row, build_set, calls_after_qg, release_gold, split_qg
    from subq.prompts import messages, template_for
    from subq.schema import write_parquet

    d = BatchDriver(cfg, prices)
    d.check_support()
    d.done = d.cache.keys()
    if not cfg.retry_failed:
        for s in d.state["shards"].values():
            d.errors.update(s.get("request_errors") or {})
    fam, job = cfg.template, dict(template=cfg.template, model=cfg.model)
    qg_tid = template_for(fam, "qg")
    items = {p.problem_id: dict(problem_id=p.problem_id, problem=p.problem, gold_answer=p.gold_answer,
                                source=p.source, source_index=p.index) for p in pending}
    plan = {pid: [[d.request(pid, "qg", i, qg_tid, i, messages(qg_tid, it["problem"]))] for i in range(cfg.n_sets)]
            for pid, it in items.items()}
    try:
        d.run_round("qg", [r for sets in plan.values() for s in sets for r in s])
        second = []
        for pid, sets in plan.items():
            if all(s[0]["key"] in d.done for s in sets):
                for i, s in enumerate(sets):
                    qs, _ = split_qg(fam, d.cache.get(s[0]["key"])["text"])
                    for stage, tid, sample, msgs in calls_after_qg(fam, items[pid]["problem"], i, cfg.n_feedback, qs):
                        s.append(d.request(pid, stage, i, tid, sample, msgs, len(qs)))
                second += [r for s in sets for r in s[1:]]
        d.run_round("answers", second)
    except KeyboardInterrupt:
        running = [s["batch_id"] for s in d.state["shards"].values() if s.get("batch_id") and not s["collected"]]
        console.echo(f"stopped: {len(running)} batch(es) keep running at the provider (ids in {d.state_path}); "
                     f"re-run the same command to collect them, or add --cancel to cancel them")
        raise
    rows, fails, outs = [], [], []
    billed_by_pid: dict[str, list] = {}
    for e in d.billed.values():
        billed_by_pid.setdefault(e["pid"], []).append(e)
    for pid, sets in plan.items():
        it = items[pid]
        reqs = [r for s in sets for r in s]
        err = next((r for r in reqs if r["cid"] in d.errors), None)
        complete = all(len(s) == 2 + cfg.n_feedback for s in sets) and all(r["key"] in d.done for r in reqs)
        entries = [d.cache.get(r["key"]) for r in reqs] if complete and err is None else []
        acct = {"calls": len(reqs), "cached": sum(r["key"] not in d.fresh for r in reqs),
                "attempts": sum(r["key"] in d.fresh for r in reqs), "n_429": 0,
                "prompt_tokens": sum(e["prompt_tokens"] for e in entries),
                "completion_tokens": sum(e["completion_tokens"] for e in entries),
                "cost_usd": sum(e["cost_usd"] for e in entries),
                "new_prompt_tokens": 0, "new_completion_tokens": 0, "new_cost_usd": 0.0}
        for e in billed_by_pid.pop(pid, []):  # this run's bill: every billed reply, by stage (summary "by_stage")
            for k in ("prompt_tokens", "completion_tokens", "cost_usd"):
                acct[f"new_{k}"] += e[k]
                acct[f"{e['stage']}_{k}"] = acct.get(f"{e['stage']}_{k}", 0) + e[k]
        if entries:
            gold = release_gold(it["gold_answer"])
            built = []
            for i, s in enumerate(sets):
                qs, qtext = split_qg(fam, entries[i * (2 + cfg.n_feedback)]["text"])
                e = entries[i * (2 + cfg.n_feedback):(i + 1) * (2 + cfg.n_feedback)]
                built.append(build_set(fam, qtext, e[1]["text"], gold, [x["text"] for x in e[2:]]))
            rows.append(build_row(it, built, job, acct))
            outs.append({"problem_id": pid, "status": "ok", "error": None, **acct})
        elif err is None and d.budget_hit:  # not submitted for the budget: not a failure, a later run goes on
            outs.append({"problem_id": pid, "status": "budget", "error": None, **acct})
        else:
            if err is not None:
                stage, reason = err["stage"], d.errors[err["cid"]]
            else:
                stage, reason = "qg", "no result from the Batch API"
            etype = ("TeacherMalformedError" if "TeacherMalformedError" in reason
                     else "BatchNotRun" if reason.startswith("BatchNotRun") else "BatchRequestError")
            fails.append(dict(problem_id=pid, problem=it["problem"], source=it["source"],
                              source_index=it["source_index"], stage=stage, error_type=etype, reason=reason,
                              attempts=acct["attempts"], time=time.time()))
            outs.append({"problem_id": pid, "status": "failed", "error": reason, **acct})
    for i in range(0, len(rows), cfg.batch_size):
        chunk = rows[i:i + cfg.batch_size]
        write_parquet(chunk, storage.join(cfg.output, "parts", _part_name([r.problem_id for r in chunk])))
    if fails:
        _write_table(pa.Table.from_pylist(fails, schema=FAILURE_SCHEMA),
                     storage.join(cfg.output, "failures", _part_name([f["problem_id"] for f in fails])))
    if outs:
        keys = sorted({k for o in outs for k in o} | {"actor"})
        progress.add({k: [o.get(k, "batch-driver" if k == "actor" else None) for o in outs] for k in keys})
    for e in (e for es in billed_by_pid.values() for e in es):  # billed replies of problems outside this run
        for k in ("prompt_tokens", "completion_tokens", "cost_usd"):  # (an earlier run's batches collected now)
            progress.c[f"new_{k}"] += e[k]
            progress.c[f"{e['stage']}_{k}"] += e[k]
    return None, {"rate": None, "budget": None, "batch": d.summary()}


def cancel_batches(cfg, prices) -> dict:
    """`--cancel`: cancel the batches this output has in flight."""
    return BatchDriver(cfg, prices).cancel()

