"""The teacher server's OpenAI Batch API: `/v1/files` and `/v1/batches`, mounted by pipelines.teacher_server.

    POST   /v1/files                  multipart upload (`purpose=batch`): a JSONL of requests -> FileObject
    GET    /v1/files                  list (?purpose)
    GET    /v1/files/{id}             FileObject
    GET    /v1/files/{id}/content     the file's bytes (uploaded requests, or a batch's output / error file)
    DELETE /v1/files/{id}
    POST   /v1/batches                {input_file_id, endpoint="/v1/chat/completions", completion_window, metadata}
    GET    /v1/batches/{id}           Batch (status validating -> in_progress -> finalizing -> completed, or
                                      failed / expired / cancelling -> cancelled)
    GET    /v1/batches                list (?limit, ?after), newest first, like the provider
    POST   /v1/batches/{id}/cancel
    GET    /v1/stats/batches          what was uploaded and submitted (tests prove nothing was submitted twice),
                                      HTTP calls to the routes above (`api_calls`)

Each request line is answered like `POST /v1/chat/completions` (the same `Replier`: replay or labelled synthetic
replies). Batch lines carry no headers, so the sample index comes from the request's `custom_id`: subq's batch
driver writes `PROBLEM_ID|STAGE|SET|SAMPLE` and the server reads the last `|`-separated number (any other
custom_id gets a random sample, like a request without `x-subq-sample-index`).

Simulated provider behaviour (TeacherServerConfig `batch_*` fields, `subq teacher-server --batch-*` flags):
- `batch_delay_s`: processing time of one batch; requests are answered in 10 steps over it, so a cancel or an
  expiry leaves a partial output file, as the provider does;
- `batch_error_rate`: share of requests answered with a per-request 500 (in the batch's error file);
- `batch_malformed_rate`: share of requests answered 200 with a reply in no expected format (billed);
- `batch_expire_first`: the first N batches created expire after half their requests (the rest are in the error
  file with code `batch_expired`);
- `batch_bad_output_first` + `batch_bad_output` (`malformed` | `missing`): the first N batches that complete get
  an output file with a broken line in the middle, or an `output_file_id` whose content is gone (404);
- `batch_upload_fail_first`: the first N uploads answer 500 (clients retry);
- `batch_api=False`: no Batch API at all (404), like many OpenAI-compatible servers.

Every request answered with status 200 is billed (the server's `/v1/organization/usage/completions`, `batch: true`),
whether or not its output file can later be read, as a provider bills it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import threading
import time
from typing import Optional

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from subq.costs import estimate_tokens

_SAMPLE = re.compile(r"\|(\d+)$")
TERMINAL = ("completed", "failed", "expired", "cancelled")


def _id(prefix: str, *parts) -> str:
    return prefix + hashlib.sha256("|".join(map(str, (*parts, time.time_ns()))).encode()).hexdigest()[:24]


def batch_router(cfg, replier, rng: Optional[random.Random] = None, ledger=None) -> APIRouter:
    """The Batch API routes over `cfg` (a TeacherServerConfig) and the server's `replier`; every answered request
    (status 200) is billed into `ledger` (pipelines.teacher_server.UsageLedger) as a Batch request."""
    lock = threading.Lock()

    def count_call(request: Request):
        if not request.url.path.endswith("/stats/batches"):
            with lock:
                stats["api_calls"] += 1

    router = APIRouter(dependencies=[Depends(count_call)])
    rng = rng or random.Random(cfg.seed + 2)
    files: dict[str, dict] = {}
    batches: dict[str, dict] = {}
    stats = {"api_calls": 0, "uploads": 0, "upload_failures": 0, "batches_created": 0, "cancel_calls": 0,
             "requests_answered": 0,
             "request_errors": 0, "by_status": {}, "submitted_by_custom_id": {}}
    counters = {"expired": 0, "bad_output": 0}

    def err(status: int, message: str, etype: str = "invalid_request_error", code: str | None = None):
        return JSONResponse({"error": {"message": message, "type": etype, "param": None, "code": code}},
                            status_code=status)

    def file_obj(f: dict) -> dict:
        return {"id": f["id"], "object": "file", "bytes": len(f["data"]), "created_at": f["created_at"],
                "filename": f["filename"], "purpose": f["purpose"], "status": "processed", "status_details": None}

    def new_file(data: bytes, filename: str, purpose: str) -> dict:
        f = {"id": _id("file-", filename), "data": data, "filename": filename, "purpose": purpose,
             "created_at": int(time.time())}
        files[f["id"]] = f
        return f

    def batch_obj(b: dict) -> dict:
        return {k: v for k, v in b.items() if not k.startswith("_")}

    if not cfg.batch_api:
        return router

    @router.post("/v1/files")
    async def upload(request: Request):
        form = await request.form()  # python-multipart
        with lock:
            stats["uploads"] += 1
            if stats["uploads"] <= cfg.batch_upload_fail_first:
                stats["upload_failures"] += 1
                return err(500, "The server had an error while processing your request.", "server_error")
        up, purpose = form.get("file"), form.get("purpose")
        if up is None or not hasattr(up, "read"):
            return err(400, "missing multipart field 'file'")
        if purpose != "batch":
            return err(400, f"unsupported purpose {purpose!r}: this server takes purpose=batch")
        data = await up.read()
        with lock:
            f = new_file(data, up.filename or "upload.jsonl", "batch")
        return file_obj(f)

    @router.get("/v1/files")
    async def list_files(purpose: Optional[str] = None):
        data = [file_obj(f) for f in files.values() if purpose in (None, f["purpose"])]
        return {"object": "list", "data": data, "has_more": False}

    @router.get("/v1/files/{file_id}")
    async def get_file(file_id: str):
        f = files.get(file_id)
        return file_obj(f) if f else err(404, f"No such File object: {file_id}")

    @router.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        f = files.get(file_id)
        if f is None or f.get("gone"):
            return err(404, f"No such File object: {file_id}")
        return Response(f["data"], media_type="application/octet-stream")

    @router.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        with lock:
            f = files.pop(file_id, None)
        return {"id": file_id, "object": "file", "deleted": f is not None}

    @router.get("/v1/stats/batches")
    async def batch_stats():
        with lock:
            out = json.loads(json.dumps(stats))
        out["submitted_twice"] = sorted(k for k, v in stats["submitted_by_custom_id"].items() if v > 1)
        out["batches"] = {b["id"]: b["status"] for b in batches.values()}
        return out

    @router.post("/v1/batches")
    async def create_batch(request: Request):
        try:
            body = json.loads(await request.body())
            input_file_id = body["input_file_id"]
        except (ValueError, KeyError, TypeError) as e:
            return err(400, f"invalid request body: {e}")
        if body.get("endpoint") != "/v1/chat/completions":
            return err(400, f"unsupported endpoint {body.get('endpoint')!r}: this server batches /v1/chat/completions")
        if body.get("completion_window") != "24h":
            return err(400, "completion_window must be '24h'")
        f = files.get(input_file_id)
        if f is None:
            return err(404, f"No such File object: {input_file_id}")
        now = int(time.time())
        with lock:
            b = {"id": _id("batch_", input_file_id), "object": "batch", "endpoint": body["endpoint"], "errors": None,
                 "input_file_id": input_file_id, "completion_window": "24h", "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
                 "expires_at": now + 86400, "finalizing_at": None, "completed_at": None, "failed_at": None,
                 "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": body.get("metadata"),
                 "_cancel": False, "_seq": stats["batches_created"]}
            batches[b["id"]] = b
            stats["batches_created"] += 1
            expire = counters["expired"] < cfg.batch_expire_first
            counters["expired"] += int(expire)
        asyncio.get_running_loop().create_task(_process(b, f["data"], expire))
        return batch_obj(b)

    @router.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str):
        b = batches.get(batch_id)
        return batch_obj(b) if b else err(404, f"No such Batch object: {batch_id}")

    @router.get("/v1/batches")
    async def list_batches(limit: int = 20, after: Optional[str] = None):
        items = sorted(batches.values(), key=lambda b: b["_seq"], reverse=True)
        if after:
            ids = [b["id"] for b in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        page = items[:limit]
        return {"object": "list", "data": [batch_obj(b) for b in page],
                "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None,
                "has_more": len(items) > limit}

    @router.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str):
        b = batches.get(batch_id)
        if b is None:
            return err(404, f"No such Batch object: {batch_id}")
        with lock:
            stats["cancel_calls"] += 1
            if b["status"] not in TERMINAL and b["status"] != "cancelling":
                b["_cancel"] = True
                b["status"], b["cancelling_at"] = "cancelling", int(time.time())
        return batch_obj(b)

    def answer(line: dict) -> tuple[int, dict]:
        """One request line -> (status code, response body), like POST /v1/chat/completions."""
        body = line.get("body") or {}
        msgs = body.get("messages")
        if not isinstance(msgs, list) or "model" not in body:
            return 400, {"error": {"message": "body needs model and messages", "type": "invalid_request_error"}}
        if cfg.models is not None and body["model"] not in cfg.models:
            return 404, {"error": {"message": f"The model `{body['model']}` does not exist.",
                                   "type": "invalid_request_error", "code": "model_not_found"}}
        if rng.random() < cfg.batch_error_rate:
            return 500, {"error": {"message": "The server had an error while processing your request.",
                                   "type": "server_error"}}
        content = "\n".join(m.get("content") or "" for m in msgs if isinstance(m, dict))
        m = _SAMPLE.search(str(line.get("custom_id", "")))
        text, prov = replier.reply(content, int(m.group(1)) if m else None)
        if cfg.batch_malformed_rate and rng.random() < cfg.batch_malformed_rate:
            text, prov = "I'm sorry, but I can't help with that request right now.", "malformed"
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)
        pt, ct = estimate_tokens(content), min(estimate_tokens(text), max_tokens)
        if ledger is not None:
            ledger.add(body["model"], pt, ct, batch=True)
        return 200, {"id": _id("chatcmpl-", line.get("custom_id")), "object": "chat.completion",
                     "created": int(time.time()), "model": body["model"], "system_fingerprint": f"subq-{prov}",
                     "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                  "message": {"role": "assistant", "content": text}}],
                     "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
                     "subq_provenance": prov}

    async def _process(b: dict, data: bytes, expire: bool) -> None:
        await asyncio.sleep(min(0.05, cfg.batch_delay_s))
        lines, bad = [], []
        for i, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                if line.get("url") != b["endpoint"] or "custom_id" not in line or line.get("method") != "POST":
                    raise ValueError("needs custom_id, method POST and url " + b["endpoint"])
                lines.append(line)
            except (ValueError, AttributeError) as e:
                bad.append({"code": "invalid_request", "message": f"line {i}: {e}", "line": i})
        ids = [ln["custom_id"] for ln in lines]
        if bad or len(set(ids)) != len(ids) or not lines:
            if len(set(ids)) != len(ids):
                bad.append({"code": "duplicate_custom_id", "message": "custom_id values must be unique", "line": None})
            if not lines and not bad:
                bad.append({"code": "empty_file", "message": "the input file has no requests", "line": None})
            with lock:
                b.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": bad})
            return
        with lock:
            for cid in ids:
                stats["submitted_by_custom_id"][cid] = stats["submitted_by_custom_id"].get(cid, 0) + 1
            b.update(status="in_progress", in_progress_at=int(time.time()))
            b["request_counts"]["total"] = len(lines)
        out, errs = [], []
        stop_at = len(lines) // 2 if expire else len(lines)
        steps = 10
        per_step = max(1, -(-len(lines) // steps))
        done = 0
        ended = "completed"
        for start in range(0, len(lines), per_step):
            until = time.monotonic() + cfg.batch_delay_s / steps
            while time.monotonic() < until and not b["_cancel"]:  # a cancel is noticed within 0.1 s
                await asyncio.sleep(min(0.1, until - time.monotonic()))
            if b["_cancel"]:
                ended = "cancelled"
                break
            for line in lines[start:start + per_step]:
                if done >= stop_at:
                    ended = "expired"
                    break
                status, body = answer(line)
                rec = {"id": _id("batch_req_", line["custom_id"]), "custom_id": line["custom_id"],
                       "response": {"status_code": status, "request_id": _id("req_"), "body": body}, "error": None}
                (out if status == 200 else errs).append(rec)
                done += 1
                with lock:
                    stats["requests_answered"] += 1
                    stats["request_errors"] += int(status != 200)
                    b["request_counts"]["completed" if status == 200 else "failed"] += 1
            if ended == "expired":
                break
        code = {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(ended)
        if code:
            for line in lines[done:]:
                errs.append({"id": _id("batch_req_", line["custom_id"]), "custom_id": line["custom_id"],
                             "response": None, "error": {"code": code, "message": f"This request was not run: {code}"}})
        with lock:
            b["status"], b["finalizing_at"] = ("finalizing" if ended == "completed" else b["status"]), int(time.time())
        payload = "".join(json.dumps(r) + "\n" for r in out).encode()
        with lock:
            if out:
                corrupt = ended == "completed" and counters["bad_output"] < cfg.batch_bad_output_first
                counters["bad_output"] += int(corrupt)
                if corrupt and cfg.batch_bad_output == "malformed":
                    half = payload.splitlines(keepends=True)
                    half.insert(len(half) // 2, b'{"id": "batch_req_broken", "custom_id": \n')
                    payload = b"".join(half)
                f = new_file(payload, f"{b['id']}_output.jsonl", "batch_output")
                if corrupt and cfg.batch_bad_output == "missing":
                    f["gone"] = True
                b["output_file_id"] = f["id"]
            if errs:
                b["error_file_id"] = new_file("".join(json.dumps(r) + "\n" for r in errs).encode(),
                                              f"{b['id']}_error.jsonl", "batch_output")["id"]
            b["status"] = ended
            b[f"{ended}_at"] = int(time.time())
            stats["by_status"][ended] = stats["by_status"].get(ended, 0) + 1

    return router
