"""The solver backend: the paper QA / DoC solve prompt through any OpenAI-compatible endpoint
(actors.teacher.TeacherClient: the openai SDK, retries, the cluster limiter) or a local HF model; the pre-flight
reachability check. Used by the Serve app's Solver deployment and `subq eval`."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Optional

from subq.errors import ConfigError, SubqError
from subq.evaluation import Answer, Decomposition, StageUsage, stage_usage
from subq.parsers import parse_doc_subquestions, parse_subquestions
from subq.prompts import messages, template_for
from subq.settings import SolverSettings


class UpstreamError(SubqError):
    """The solver's upstream failed beyond retries (HTTP 502 at the Serve ingress)."""

    def __init__(self, message: str, upstream: str, status: Optional[int] = None):
        super().__init__(message, source=upstream)
        self.upstream = upstream
        self.status = status


class Solver:
    """Answers sub-questions (and writes the teacher's decomposition) through an OpenAI-compatible endpoint
    (actors.teacher.TeacherClient: the openai SDK, retries, the cluster limiter) or a local HF model."""

    def __init__(self, settings: SolverSettings, api_key_ref: Optional[list] = None):
        """`api_key_ref`: [ObjectRef] of the key, put by the driver, for workers whose environment lacks the
        variable (a cluster joined through RAY_ADDRESS: the key travels in the object store, never in task specs,
        runtime_env or logs; actors.teacher.TeacherActor does the same for the teacher)."""
        self.settings = settings
        self.price = settings.price()
        self.family = settings.prompt
        self._client = None
        self._local = None
        from cluster.submit import load_secret, worker_key

        load_secret()  # under `subq submit`: the key shipped with the job (never in its env_vars or entrypoint)
        self._key = worker_key(settings.api_key_env, api_key_ref)

    # -- backends
    def _openai_client(self):
        if self._client is None:
            from actors.teacher import TeacherClient

            s = self.settings
            self._client = make_teacher_client(TeacherClient, s, self._key)
        return self._client

    def _local_model(self):
        if self._local is None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = self.settings.local_path
            if not path:
                raise ConfigError("backend=local needs a checkpoint directory", field="solver.local_path")
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path).eval()
            torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
            self._local = (tok, model)
        return self._local

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    async def chat(self, msgs: list[dict], *, temperature: Optional[float] = None,
                   max_tokens: Optional[int] = None) -> tuple[str, StageUsage]:
        """One chat call -> (reply text, usage). Raises UpstreamError naming the upstream on failure."""
        s, t0 = self.settings, time.perf_counter()
        temperature = s.temperature if temperature is None else temperature
        max_tokens = s.max_tokens if max_tokens is None else max_tokens
        if s.backend == "local":
            return await asyncio.to_thread(self._local_chat, msgs, temperature, max_tokens, t0)
        client = self._openai_client()
        try:
            res = await client.chat(msgs, temperature=temperature, max_tokens=max_tokens)
        except SubqError as e:
            raise UpstreamError(self._redact(str(e)), s.upstream(), getattr(e, "status", None)) from None
        except Exception as e:  # network stack errors the client did not wrap
            raise UpstreamError(self._redact(f"{type(e).__name__}: {e}"), s.upstream()) from None
        cost = getattr(res, "cost_usd", None)
        u = stage_usage(s.name, self.price, res.prompt_tokens, res.completion_tokens, t0,
                   calls=getattr(res, "attempts", 1) or 0,
                   cost=None if cost is None or (cost == 0 and self.price.input_per_1k) else cost)
        u.provenance = provenance_of(res)
        return res.text, u

    def _local_chat(self, msgs, temperature, max_tokens, t0) -> tuple[str, StageUsage]:
        import torch

        tok, model = self._local_model()
        prompt = "\n\n".join(m["content"] for m in msgs)
        enc = tok(prompt, return_tensors="pt", truncation=True, max_length=getattr(model.config, "n_positions", 1024) - max_tokens)
        kw = dict(max_new_tokens=max_tokens, do_sample=temperature > 0, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        if temperature > 0:
            kw["temperature"] = temperature
        with torch.no_grad():
            out = model.generate(**enc, **kw)
        new = out[0, enc["input_ids"].shape[1]:]
        text = tok.decode(new, skip_special_tokens=True)
        return text, stage_usage(self.settings.name, self.price, enc["input_ids"].shape[1], len(new), t0)

    # -- the two roles
    async def answer(self, problem: str, questions: list[str]) -> Answer:
        """Solver stage: the paper QA (or DoC solve) prompt over the problem and its sub-questions."""
        tid = template_for(self.family, "qa")
        msgs = messages(tid, problem, questions, open_model=self.settings.backend == "local")
        text, usage = await self.chat(msgs)
        return Answer(text, usage)

    async def decompose(self, problem: str) -> Decomposition:
        """Teacher decomposition: the QG (or DoC decompose) prompt sent to the solver's endpoint."""
        tid = template_for(self.family, "qg")
        text, usage = await self.chat(messages(tid, problem))
        parsed = parse_doc_subquestions(text) if self.family == "doc" else parse_subquestions(text)
        return Decomposition(parsed.questions, text, usage)


def provenance_of(res) -> Optional[str]:
    """Where a reply came from: the upstream's `x-subq-provenance` header (the local teacher server sets it), or
    for a cached reply the `subq-<provenance>` system fingerprint it was stored with; None for real providers."""
    hdr = (getattr(res, "raw_headers", None) or {}).get("x-subq-provenance")
    if hdr:
        return hdr
    fp = getattr(res, "provenance", None) or ""
    return fp[len("subq-"):] if fp.startswith("subq-") else None


def check_solver(s: SolverSettings, timeout_s: float = 10.0) -> None:
    """Before any work: the solver's key is set and its endpoint answers (GET /models). Raises SubqError naming
    the variable or the URL. The local teacher server accepts any key (e.g. OPENAI_API_KEY=unused)."""
    if s.backend != "openai":
        return
    from cluster.submit import load_secret

    load_secret()
    key = os.environ.get(s.api_key_env)
    if not key:
        raise ConfigError(f"no solver API key: the environment variable {s.api_key_env} is not set",
                          field="solver.api_key_env",
                          hint=f"export {s.api_key_env}=...; the local teacher server (subq teacher-server) accepts "
                               f"any value, e.g. {s.api_key_env}=unused")
    import httpx

    url = s.upstream().rstrip("/") + "/models"
    try:
        r = httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise SubqError(f"the solver endpoint {s.upstream()} does not answer ({type(e).__name__})",
                        field="solver.base_url", hint="start it (e.g. subq teacher-server) or fix --solver-base-url") from None
    if r.status_code in (401, 403):
        raise SubqError(f"the solver endpoint {s.upstream()} rejected the key in {s.api_key_env} (HTTP {r.status_code})",
                        field="solver.api_key_env")


def make_teacher_client(TeacherClient, s: SolverSettings, key: Optional[str]):
    """actors.teacher.TeacherClient from solver settings (SolverSettings.client_kwargs: the same for every caller)."""
    return TeacherClient(**s.client_kwargs(), api_key=key)
