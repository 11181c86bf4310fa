"""The two model deployments: `Decomposer` (batched, ILQL-guided decoding) and `Solver` (OpenAI-compatible or local)."""

import asyncio
import collections
import json
import threading
import time
from typing import Optional

from ray import serve

from actors.solver import Solver, UpstreamError
from subq.settings import DecomposerSettings, SolverSettings
from training.decomposer import LocalDecomposer
from pipelines.serve.api import _chat_response, problem_from_messages


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
        self.batches = 0  # batches decoded; the per-batch lists below keep the last 1000
        self.batch_sizes: collections.deque = collections.deque(maxlen=1000)
        self.batch_arrivals: collections.deque = collections.deque(maxlen=1000)  # when its requests reached us
        self.cancelled: list[dict] = []  # requests whose caller left mid-decode: tokens decoded of their budget
        self.batch_groups: collections.deque = collections.deque(maxlen=1000)  # generate calls per batch
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
        self.batches += 1
        self.batch_sizes.append(len(requests))
        self.batch_arrivals.append(sorted(r[3] for r in requests))  # time.monotonic() of each request's arrival
        # one generate call per beta in the batch; every other setting is per row (a request's n samples are n rows,
        # sample j seeded seed + j)
        groups: dict[str, list[int]] = {}
        for i, (_, params, _gone, _arrived) in enumerate(requests):
            groups.setdefault(json.dumps({k: v for k, v in params.items() if k not in ROW_SETTINGS},
                                         sort_keys=True), []).append(i)
        self.batch_groups.append(len(groups))
        results: list[Optional[dict]] = [None] * len(requests)
        for key, idx in groups.items():
            rows: dict[str, list] = {k: [] for k in ("problems", "max_new_tokens", "do_sample", "temperature",
                                                      "top_p", "stop", "seed", "cancelled")}
            for i in idx:
                problem, p, gone, _ = requests[i]
                for j in range(p.get("n", 1)):
                    rows["problems"].append(problem)
                    for k in ("max_new_tokens", "do_sample", "temperature", "top_p", "stop"):
                        rows[k].append(p.get(k))
                    rows["seed"].append(None if p.get("seed") is None else p["seed"] + j)
                    rows["cancelled"].append(gone)  # one flag per row: the n samples of a request leave together
            try:
                decs = await asyncio.to_thread(self.local.decompose_batch, rows.pop("problems"), **rows,
                                               **json.loads(key))
                at = 0
                for i in idx:
                    n = requests[i][1].get("n", 1)
                    choices = [{"questions": d.questions, "text": d.text, "usage": d.usage.to_dict(),
                                "finish_reason": d.finish_reason} for d in decs[at:at + n]]
                    at += n
                    if any(c["finish_reason"] == "cancelled" for c in choices):
                        self.cancelled.append({"completion_tokens": sum(c["usage"]["completion_tokens"] for c in choices),
                                               "max_new_tokens": requests[i][1]["max_new_tokens"] * n})
                    results[i] = {"ok": True, **choices[0], "choices": choices}
            except Exception as e:  # noqa: BLE001 - reported per request
                for i in idx:
                    results[i] = _err("decompose", e)
        return results

    async def decompose(self, problem: str, params: Optional[dict] = None) -> dict:
        """One request's decode, batched with others. When its caller leaves (the HTTP client disconnected: Serve
        cancels this call), its rows leave the running decode at the next check (every 8 tokens) instead of
        decoding to the end of their budget."""
        gone = threading.Event()
        try:
            return await self._batched((problem, self._normalize(params or {}), gone, time.monotonic()))
        except asyncio.CancelledError:
            gone.set()
            raise

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

    def stats(self, since: int = 0) -> dict:
        """Counters; the per-batch lists hold the batches after the first `since` (of the last 1000 kept):
        `seen = stats()["batches"]`, send, then `stats(since=seen)` gives exactly the new batches."""
        import torch

        skip = max(0, len(self.batch_sizes) - (self.batches - since))
        return {"batches": self.batches, "batch_sizes": list(self.batch_sizes)[skip:],
                "batch_arrivals": list(self.batch_arrivals)[skip:], "batch_groups": list(self.batch_groups)[skip:],
                "torch_threads": torch.get_num_threads(), "cancelled": list(self.cancelled)}


@serve.deployment(name="Solver")
class SolverDeployment:
    """The solver: answers (and, in `teacher` mode, writes the decomposition) through the configured backend."""

    def __init__(self, settings: dict, api_key_ref: Optional[list] = None):
        self.settings = SolverSettings(**settings)
        self.solver = Solver(self.settings, api_key_ref=api_key_ref)

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
