"""Evaluation of decomposer x solver pairs over a GSM8K split: the batch job behind `subq eval`, and the
bookkeeping (per-item results, accuracy in every scoring mode, tokens and $ per stage, reports) that the
Serve app's `/v1/evaluations` endpoint shares. One home for both, so the endpoint and the batch job agree.

Run it:

    subq eval --data gsm8k:test --limit 20 --decomposer none --decomposer teacher \\
        --decomposer ckpt/bc=/path/to/bc_checkpoint --solver-model gpt-3.5-turbo \\
        --solver-base-url http://127.0.0.1:8100/v1 --out reports/eval1
    python -m pipelines.evaluate --data gsm8k:test --limit 20 --out reports/eval1 ...   # same flags
    ray job submit --working-dir . -- python -m pipelines.evaluate --data gsm8k:test --limit 200 \\
        --decomposer teacher --solver-base-url http://HOST:8100/v1 --out s3://bucket/reports/eval1

Modes (Divide-or-Conquer's comparison; `decomposer` names which):
- `none`: single-stage, the solver answers the problem alone (QA / solve prompt with no sub-questions);
- `teacher`: two-stage, the solver's own endpoint writes the sub-questions with the QG (or DoC decompose) prompt;
- a distilled decomposer checkpoint (`name=path`): two-stage, sub-questions from our local model
  (`training.decomposer.generate_subquestions`, ILQL-guided when the checkpoint has heads and beta != 0).

Report directory: `results.json` (config, per pair: summary + per-item results), `report.md` (decomposer x
solver table: accuracy per scoring mode, tokens and $ per stage), `accuracy_vs_cost.png`,
`subquestions_hist.png`, and per pair `<decomposer>__<solver>.paper_raw.jsonl` in the release's raw format,
so `subq score FILE --mode M` reproduces the reported accuracy.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from subq import storage
from subq.costs import Price, PriceTable
from subq.errors import ConfigError, SubqError
from subq.parsers import format_subquestions, parse_answers, parse_doc_subquestions, parse_subquestions
from subq.problems import Problem
from subq.prompts import messages, template_for
from subq.schema import SubQRow, SubQuestionSet, write_paper
from subq.scoring import MODES, Score, gold_number, mcnemar_exact, score, summarize, wilson_interval

STAGES = ("decompose", "solve")
DOC_ANSWER = re.compile(r"the answer is:?\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)


# ---------------------------------------------------------------- settings


class SolverSettings(BaseModel):
    """How the solver (answerer) is reached. Shared by the Serve app and `subq eval`."""

    name: str = Field("gpt-3.5-turbo", description="Model name sent upstream (openai) or served id (local); also the price-table key.")
    backend: Literal["openai", "local"] = Field("openai", description="openai: any OpenAI-compatible endpoint via the openai SDK; local: an HF causal LM on this node.")
    base_url: Optional[str] = Field(None, description="OpenAI-compatible base URL (e.g. http://127.0.0.1:8100/v1); None = the SDK default (api.openai.com).")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the upstream key (the key itself never goes in a config).")
    local_path: Optional[str] = Field(None, description="HF checkpoint directory for backend=local.")
    prompt: Literal["paper", "doc"] = Field("paper", description="paper: GSM8K-AI-SubQ QA prompt ('Final answer:'); doc: Divide-or-Conquer solver prompt ('The answer is:').")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature (the paper evaluates at 0).")
    max_tokens: int = Field(500, gt=0, description="Max completion tokens per solver call (paper: 500).")
    max_retries: int = Field(4, ge=0, description="Retries on 429/5xx/timeouts before the call fails (then HTTP 502).")
    timeout_s: float = Field(60.0, gt=0, description="Per-call timeout in seconds.")
    rpm: Optional[float] = Field(None, gt=0, description="Requests/minute cap through the cluster limiter (None: no cap).")
    tpm: Optional[float] = Field(None, gt=0, description="Tokens/minute cap through the cluster limiter (None: no cap).")
    price_table: Optional[str] = Field(None, description="YAML price table adding/overriding subq.costs defaults.")
    price_input_per_1k: Optional[float] = Field(None, ge=0, description="Override: $ per 1K prompt tokens for this solver.")
    price_output_per_1k: Optional[float] = Field(None, ge=0, description="Override: $ per 1K completion tokens for this solver.")
    cache_dir: Optional[str] = Field(None, description="Durable request cache of solver replies (actors.teacher.RequestCache): a re-run pays nothing. `subq eval` default: <out>/cache.")

    def price(self) -> Price:
        # the one override rule (subq.costs.PriceTable.with_override), as in generation: a side not overridden
        # keeps the table's price (a local backend's table price is 0)
        table = PriceTable({self.name: Price(0.0, 0.0)}) if self.backend == "local" else PriceTable.load(self.price_table)
        try:
            return table.with_override(self.name, self.price_input_per_1k, self.price_output_per_1k).price(self.name)
        except ConfigError:
            raise ConfigError(f"no price for solver model {self.name!r}", field="solver.name",
                              hint="set solver.price_input_per_1k/price_output_per_1k (--solver-price-input/--solver-price-output) "
                                   "or solver.price_table") from None

    def upstream(self) -> str:
        if self.backend == "local":
            return f"local:{self.local_path}"
        return self.base_url or "https://api.openai.com/v1"


class DecomposerSettings(BaseModel):
    """The distilled decomposer: a local HF (BC/FBC) or ILQL checkpoint."""

    path: Optional[str] = Field(None, description="Checkpoint directory (training's HF save, ILQL heads beside it). None: no distilled decomposer.")
    name: str = Field("subq-decomposer", description="Id under which it is listed on /v1/models and in reports.")
    beta: Optional[float] = Field(None, description="ILQL guidance weight (log pi + beta*(minQ - V)); None: the checkpoint's own ilql.beta (as in training's validation); ignored without heads; 0 = plain BC decoding.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature when do_sample.")
    max_new_tokens: int = Field(256, gt=0, le=4096, description="Max generated tokens per decomposition (training.decomposer.DEFAULT_MAX_NEW_TOKENS; the release allowed the reference length + 200).")
    device: str = Field("cpu", description="torch device for the model (cpu, cuda).")
    price_input_per_1k: float = Field(0.0, ge=0, description="$ per 1K prompt tokens (a local model costs 0 unless you price it, e.g. subq.costs.scaled_price).")
    price_output_per_1k: float = Field(0.0, ge=0, description="$ per 1K completion tokens.")

    def price(self) -> Price:
        return Price(self.price_input_per_1k, self.price_output_per_1k)


def follow_reserved_gpus(decomposer: DecomposerSettings, num_gpus: float) -> None:
    """The decomposer's device follows the GPUs Ray reserves for it (Serve replicas and `subq eval`'s actors alike):
    never an idle reserved GPU, nor a GPU used that Ray did not reserve. Sets device to cuda when GPUs are reserved
    and no device was given; ValueError on a contradiction."""
    cuda = decomposer.device.startswith("cuda")
    if num_gpus > 0 and not cuda:
        if "device" in decomposer.model_fields_set:
            raise ValueError("decomposer.device is cpu but decomposer_num_gpus > 0 (a reserved GPU left idle)")
        decomposer.device = "cuda"
    elif cuda and num_gpus == 0:
        raise ValueError("decomposer.device is cuda but decomposer_num_gpus is 0: Ray reserves no GPU for it")


# ---------------------------------------------------------------- per-item results


@dataclass
class StageUsage:
    """Tokens, $ and time of one stage of one item."""

    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_s: float = 0.0
    calls: int = 0
    provenance: Optional[str] = None  # the upstream's x-subq-provenance (replay | synthetic | ...), None for real APIs

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Decomposition:
    questions: list[str]
    text: str
    usage: StageUsage
    finish_reason: str = "stop"  # "length": the token budget ended it (OpenAI's finish_reason)


@dataclass
class Answer:
    text: str
    usage: StageUsage


@dataclass
class ItemResult:
    """One problem through decomposer -> solver, scored in every mode."""

    index: int
    problem_id: str
    problem: str
    gold_answer: str
    decomposer: str
    solver: str
    sub_questions: list[str] = field(default_factory=list)
    decomposition_text: str = ""
    answer_text: Optional[str] = None
    final_answer: Optional[str] = None
    scores: dict = field(default_factory=dict)  # mode -> Score.to_dict()
    usage: dict = field(default_factory=dict)  # stage -> StageUsage.to_dict()
    latency_s: float = 0.0
    error: Optional[str] = None
    error_stage: Optional[str] = None
    provenance: Optional[str] = None  # the solver upstream's x-subq-provenance header (replay/synthetic offline)
    few_shot: bool = False  # a GSM8K test problem the paper's prompts quote as a few-shot example
    fell_back: bool = False  # the decomposer wrote no sub-question: the solver answered single-stage

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ItemResult":
        return cls(**d)


def paper_gold(gold: str) -> str:
    """The release's gold form `#### N` from a GSM8K worked solution (the paper rule reads the FIRST number of
    the gold string, so the worked solution itself must not be scored against)."""
    if isinstance(gold, str) and "####" in gold:
        return "#### " + gold.rsplit("####", 1)[-1].strip()
    return gold


def final_answer_of(text: Optional[str]) -> Optional[str]:
    """The final answer text the solver gave ('Final answer: N' or DoC 'The answer is: N'), or None."""
    if not text:
        return None
    parsed = parse_answers(text)
    if parsed.final_answer:
        return parsed.final_answer.strip().splitlines()[0].strip()
    m = DOC_ANSWER.search(text)
    return m.group(1) if m else None


def new_item(index: int, problem: Problem, decomposer: str, solver: str) -> ItemResult:
    return ItemResult(index=index, problem_id=problem.problem_id, problem=problem.problem,
                      gold_answer=paper_gold(problem.gold_answer), decomposer=decomposer, solver=solver,
                      few_shot=problem.is_few_shot_example)


def finish_item(item: ItemResult, decomposition: Optional[Decomposition], answer: Optional[Answer]) -> ItemResult:
    """Fill an item from its stages and score it in every mode. A failed item (`error` set) gets no scores: it is
    excluded from accuracy and counted as an error (a 503 under load is not a wrong answer)."""
    if decomposition is not None:
        item.sub_questions = list(decomposition.questions)
        item.decomposition_text = decomposition.text
        item.usage["decompose"] = decomposition.usage.to_dict()
    if answer is not None:
        item.answer_text = answer.text
        item.usage["solve"] = answer.usage.to_dict()
    provs = [u.get("provenance") for u in item.usage.values() if u.get("provenance")]
    item.provenance = item.usage.get("solve", {}).get("provenance") or (provs[0] if provs else None)
    item.fell_back = item.decomposer != "none" and "decompose" in item.usage and not item.sub_questions
    item.final_answer = final_answer_of(item.answer_text)
    item.scores = {} if item.error else {m: score(item.answer_text, item.gold_answer, m).to_dict() for m in MODES}
    item.latency_s = sum(u.get("latency_s", 0.0) for u in item.usage.values())
    return item


def fail_item(item: ItemResult, stage: str, message: str) -> ItemResult:
    item.error, item.error_stage = message, stage
    return finish_item(item, None, None)


# ---------------------------------------------------------------- summaries and paper files


OFFLINE_PROVENANCE = ("replay", "synthetic", "malformed")  # what the local teacher server labels its replies


def _accuracy(items: list[ItemResult]) -> dict:
    out = {}
    for m in MODES:
        a = summarize(Score(**it.scores[m]) for it in items if it.scores)
        a["ci95"] = list(wilson_interval(a["correct"], a["n"]))
        out[m] = a
    return out


def error_reasons(items: list[ItemResult], top: int = 3) -> list[tuple[str, int]]:
    """The most common failure reasons, each as one real message (reasons that differ only in numbers, such as
    'after 5 attempts' and 'after 6', count together)."""
    from collections import Counter

    c: Counter = Counter()
    example: dict[str, str] = {}
    for it in items:
        if it.error:
            text = f"{it.error_stage}: {it.error}"[:300]
            key = re.sub(r"\d+(\.\d+)?", "N", text)
            c[key] += 1
            example.setdefault(key, text)
    return [(example[k], n) for k, n in c.most_common(top)]


def summarize_items(items: list[ItemResult], total: Optional[int] = None) -> dict:
    """Accuracy in every scoring mode over the items that did not fail (95% Wilson interval; also without the
    few-shot problems), tokens/$ per stage (total and per problem), errors and their top reasons, sub-question
    counts, single-stage fallbacks, and where the replies came from (provenance; `offline`)."""
    n = len(items)
    accuracy = _accuracy(items)
    usage: dict[str, dict] = {}
    for stage in STAGES:
        us = [it.usage[stage] for it in items if stage in it.usage]
        tot = {k: sum(u[k] for u in us) for k in ("prompt_tokens", "completion_tokens", "cost_usd", "calls")}
        tot["cost_usd"] = round(tot["cost_usd"], 8)
        tot["tokens"] = tot["prompt_tokens"] + tot["completion_tokens"]
        tot["per_problem_tokens"] = tot["tokens"] / n if n else 0.0
        tot["per_problem_cost_usd"] = tot["cost_usd"] / n if n else 0.0
        tot["mean_latency_s"] = sum(u["latency_s"] for u in us) / len(us) if us else 0.0
        usage[stage] = tot
    total_cost = sum(usage[s]["cost_usd"] for s in STAGES)
    usage["total"] = {
        "tokens": sum(usage[s]["tokens"] for s in STAGES),
        "cost_usd": round(total_cost, 8),
        "per_problem_cost_usd": total_cost / n if n else 0.0,
    }
    counts = [len(it.sub_questions) for it in items]
    hist: dict[str, int] = {}
    for c in counts:
        hist[str(c)] = hist.get(str(c), 0) + 1
    errors = [it for it in items if it.error]
    prov: dict[str, int] = {}
    for it in items:
        if it.provenance:
            prov[it.provenance] = prov.get(it.provenance, 0) + 1
    few = [it for it in items if it.few_shot]
    return {
        "n": n,
        "total": total if total is not None else n,
        "scored": n - len(errors),
        "accuracy": accuracy,
        "few_shot_items": len(few),
        "accuracy_without_few_shot": _accuracy([it for it in items if not it.few_shot]) if few else accuracy,
        "usage": usage,
        "errors": len(errors),
        "errors_by_stage": {s: sum(1 for e in errors if e.error_stage == s) for s in STAGES},
        "error_reasons": [[r, k] for r, k in error_reasons(items)],
        "fell_back_single_stage": sum(1 for it in items if it.fell_back),
        "provenance": prov,
        "offline": any(p in OFFLINE_PROVENANCE for p in prov),
        "sub_questions": {"mean": sum(counts) / n if n else 0.0, "histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0])))},
        "mean_latency_s": sum(it.latency_s for it in items) / n if n else 0.0,
    }


def items_to_rows(items: list[ItemResult]) -> list[SubQRow]:
    """Items as GSM8K-AI-SubQ rows: one set per problem (the decomposition and the solver's reply). Failed items
    are left out, as the summary's accuracy leaves them out, so `subq score` on the file gives the same numbers."""
    rows = []
    for it in sorted(items, key=lambda i: i.index):
        if it.error:
            continue
        text = it.decomposition_text if it.sub_questions or it.decomposition_text else ""
        qtext = format_subquestions(it.sub_questions) if it.sub_questions else text
        s = SubQuestionSet.from_texts(qtext, it.answer_text or "", it.gold_answer)
        rows.append(SubQRow(problem_id=it.problem_id, problem=it.problem, gold_answer=it.gold_answer,
                            true_answer=gold_number(it.gold_answer, "paper"), sets=[s], source_index=it.index,
                            teacher_model=it.solver))
    return rows


def write_paper_raw(items: list[ItemResult], location: str) -> None:
    write_paper(items_to_rows(items), location, "paper_raw")


# ---------------------------------------------------------------- solver backends (used by SolverDeployment and eval)


def _usage(model: str, price: Price, prompt_tokens: int, completion_tokens: int, t0: float, calls: int = 1,
           cost: Optional[float] = None) -> StageUsage:
    return StageUsage(model=model, prompt_tokens=int(prompt_tokens), completion_tokens=int(completion_tokens),
                      cost_usd=price.cost(prompt_tokens, completion_tokens) if cost is None else float(cost),
                      latency_s=time.perf_counter() - t0, calls=calls)


class UpstreamError(SubqError):
    """The solver's upstream failed beyond retries (HTTP 502 at the Serve ingress)."""

    def __init__(self, message: str, upstream: str, status: Optional[int] = None):
        super().__init__(message, source=upstream)
        self.upstream = upstream
        self.status = status


class Solver:
    """Answers sub-questions (and writes the teacher's decomposition) through an OpenAI-compatible endpoint
    (actors.teacher.TeacherClient: the openai SDK, retries, the cluster limiter) or a local HF model."""

    def __init__(self, settings: SolverSettings):
        self.settings = settings
        self.price = settings.price()
        self.family = settings.prompt
        self._client = None
        self._local = None
        from cluster.submit import load_secret

        load_secret()  # under `subq submit`: the key shipped with the job (never in its env_vars or entrypoint)
        self._key = os.environ.get(settings.api_key_env) or None

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
        u = _usage(s.name, self.price, res.prompt_tokens, res.completion_tokens, t0,
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
        return text, _usage(self.settings.name, self.price, enc["input_ids"].shape[1], len(new), t0)

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
    """Build actors.teacher.TeacherClient from solver settings (only the arguments it declares)."""
    import inspect

    params = inspect.signature(TeacherClient).parameters
    wanted = {"model": s.name, "base_url": s.base_url, "api_key": key, "max_retries": s.max_retries,
              "timeout_s": s.timeout_s, "timeout": s.timeout_s, "rpm": s.rpm, "tpm": s.tpm,
              "price": s.price(), "api_key_env": s.api_key_env, "backoff_max_s": 5.0,
              "accept_invalid": None, "cache_dir": s.cache_dir}
    return TeacherClient(**{k: v for k, v in wanted.items() if k in params})


class LocalDecomposer:
    """The distilled decomposer in-process (training.decomposer): batch of problems -> Decompositions."""

    def __init__(self, settings: DecomposerSettings):
        from training.decomposer import load_decomposer

        if not settings.path:
            raise ConfigError("no decomposer checkpoint given", field="decomposer.path")
        self.settings = settings
        self.price = settings.price()
        self.model = load_decomposer(settings.path, device=settings.device)

    def decompose_batch(self, problems: list[str], *, max_new_tokens: Optional[int] = None,
                        do_sample: Optional[bool] = None, temperature: Optional[float] = None,
                        beta: Optional[float] = None, top_p: Optional[float] = None,
                        stop: Optional[list[str]] = None, n: int = 1,
                        seed: Optional[list[Optional[int]]] = None) -> list[Decomposition]:
        """n decompositions per problem, problem-major. max_new_tokens, do_sample, temperature, top_p and stop may
        also be lists (one per problem: requests with different settings share one decode); seed: one per problem
        (sample j seeded seed + j). See training.decomposer.generate_subquestions."""
        from training.decomposer import generate_subquestions

        s, t0 = self.settings, time.perf_counter()
        gens = generate_subquestions(
            self.model, problems,
            max_new_tokens=s.max_new_tokens if max_new_tokens is None else max_new_tokens,
            do_sample=s.do_sample if do_sample is None else do_sample,
            temperature=s.temperature if temperature is None else temperature,
            beta=s.beta if beta is None else beta, top_p=top_p, stop=stop, n=n, seed=seed,
        )
        out = []
        for g in gens:
            u = _usage(s.name, self.price, g.prompt_tokens, g.completion_tokens, t0)
            out.append(Decomposition(list(g.questions), g.text, u, g.finish_reason))
        return out


# ---------------------------------------------------------------- reports


def pair_name(decomposer: str, solver: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{decomposer}__{solver}")


OFFLINE_CAVEAT = ("OFFLINE: the solver is the local replay teacher server (x-subq-provenance: replay/synthetic): "
                  "its replies are the release's recorded ChatGPT answers, so accuracy measures no decomposer.")


def versions() -> dict:
    """Versions a reader needs to trust a report: subq, ray, torch, transformers, openai, python."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for pkg in ("subq", "ray", "torch", "transformers", "openai"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def git_hash() -> Optional[str]:
    import subprocess

    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                           cwd=os.path.dirname(os.path.abspath(__file__)))
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def is_offline(runs: list[dict]) -> bool:
    return any(r["summary"].get("offline") for r in runs)


def paired_vs_none(runs: list[dict], mode: str = "paper") -> list[dict]:
    """Each decomposer against `none` on the problems both scored: accuracy difference, discordant pairs
    (b = only `none` right, c = only this one right) and the exact McNemar p-value."""
    base = next((r for r in runs if r["decomposer"] == "none"), None)
    if base is None:
        return []
    ref = {it.problem_id: it.scores[mode]["correct"] for it in base["items"] if it.scores}
    out = []
    for r in runs:
        if r is base:
            continue
        pairs = [(ref[it.problem_id], it.scores[mode]["correct"]) for it in r["items"]
                 if it.scores and it.problem_id in ref]
        n = len(pairs)
        b = sum(1 for x, y in pairs if x and not y)
        c = sum(1 for x, y in pairs if y and not x)
        out.append({"decomposer": r["decomposer"], "solver": r["solver"], "mode": mode, "n_paired": n,
                    "delta": (c - b) / n if n else 0.0, "only_none_correct": b, "only_this_correct": c,
                    "mcnemar_p": mcnemar_exact(b, c)})
    return out


def _hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sample_record(it: ItemResult) -> dict:
    """One line of samples_<decomposer>.jsonl, in lm-eval's layout (doc_id, doc, target, arguments, resps,
    filtered_resps, filter, metrics, doc_hash, prompt_hash, target_hash, one key per metric) plus subq's fields."""
    metrics = {f"acc_{m}": (float(it.scores[m]["correct"]) if it.scores else None) for m in MODES}
    prompt = "\n".join(it.sub_questions)
    return {
        "doc_id": it.index,
        "doc": {"problem_id": it.problem_id, "question": it.problem, "answer": it.gold_answer},
        "target": it.gold_answer,
        "arguments": {"sub_questions": it.sub_questions, "decomposer": it.decomposer, "solver": it.solver},
        "resps": [[it.answer_text]] if it.answer_text is not None else [],
        "filtered_resps": [it.final_answer],
        "filter": "none",
        "metrics": list(metrics),
        "doc_hash": _hash(it.problem), "prompt_hash": _hash(prompt), "target_hash": _hash(it.gold_answer),
        **metrics,
        "missing_marker": {m: it.scores[m]["missing_final_answer"] for m in MODES} if it.scores else None,
        "few_shot": it.few_shot, "fell_back_single_stage": it.fell_back, "provenance": it.provenance,
        "error": it.error, "error_stage": it.error_stage, "usage": it.usage,
    }


def write_report(out: str, runs: list[dict], config: Optional[dict] = None) -> dict:
    """Write results.json, report.md, the PNGs, one paper_raw file and one lm-eval style samples file per pair.
    `runs` are {"decomposer", "solver", "summary", "items": [ItemResult]}. Returns {name: location}."""
    import datetime

    written: dict[str, str] = {}
    offline = is_offline(runs)
    payload: dict[str, Any] = {
        "results": {}, "n-samples": {}, "config": config or {}, "versions": versions(), "git_hash": git_hash(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "offline": offline, "caveat": OFFLINE_CAVEAT if offline else None,
        "paired_vs_none": paired_vs_none(runs), "runs": []}
    for r in runs:
        name = pair_name(r["decomposer"], r["solver"])
        raw = storage.join(out, f"{name}.paper_raw.jsonl")
        write_paper_raw(r["items"], raw)
        written[f"{name}.paper_raw.jsonl"] = raw
        sname = f"samples_{pair_name(r['decomposer'], '')[:-2] or 'run'}.jsonl"
        loc = storage.join(out, sname)
        storage.write_bytes_atomic(loc, "".join(json.dumps(sample_record(it)) + "\n"
                                                for it in sorted(r["items"], key=lambda i: i.index)).encode())
        written[sname] = loc
        s = r["summary"]
        payload["results"][r["decomposer"]] = {
            **{f"acc_{m},none": s["accuracy"][m]["accuracy"] for m in MODES},
            **{f"acc_{m}_ci95,none": s["accuracy"][m]["ci95"] for m in MODES}, "alias": r["decomposer"]}
        payload["n-samples"][r["decomposer"]] = {"original": s["n"], "effective": s.get("scored", s["n"])}
        payload["runs"].append({"decomposer": r["decomposer"], "solver": r["solver"], "summary": s,
                                "paper_raw": f"{name}.paper_raw.jsonl", "samples": sname,
                                "items": [it.to_dict() for it in r["items"]]})
    loc = storage.join(out, "results.json")
    storage.write_bytes_atomic(loc, json.dumps(payload, indent=2).encode())
    written["results.json"] = loc
    loc = storage.join(out, "report.md")
    storage.write_bytes_atomic(loc, markdown_report(runs).encode())
    written["report.md"] = loc
    for fname, png in plot_report(runs).items():
        loc = storage.join(out, fname)
        storage.write_bytes_atomic(loc, png)
        written[fname] = loc
    return written


def markdown_table(runs: list[dict]) -> str:
    head = ["decomposer", "solver", "n"] + [f"acc {m}" for m in MODES] + [
        "decomp tokens", "decomp $", "solve tokens", "solve $", "total $", "$ / problem", "mean #subq", "errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        s = r["summary"]
        u = s["usage"]
        cells = [r["decomposer"], r["solver"], str(s["n"])] + [f"{s['accuracy'][m]['accuracy']:.3f}" for m in MODES] + [
            str(u["decompose"]["tokens"]), f"{u['decompose']['cost_usd']:.5f}", str(u["solve"]["tokens"]),
            f"{u['solve']['cost_usd']:.5f}", f"{u['total']['cost_usd']:.5f}", f"{u['total']['per_problem_cost_usd']:.6f}",
            f"{s['sub_questions']['mean']:.2f}", str(s["errors"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ci(a: dict) -> str:
    lo, hi = a.get("ci95", (0.0, 1.0))
    return f"{a['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"


def markdown_report(runs: list[dict]) -> str:
    text = ["# subq evaluation report", ""]
    if is_offline(runs):
        text += [f"**{OFFLINE_CAVEAT}**", ""]
    text += ["Accuracy per scoring mode (`paper`, `strict`, `flexible`; see `subq.scoring`) over the items that did "
             "not fail (failed items are errors, excluded from accuracy), tokens and $ per stage "
             "(decompose = the decomposer, solve = the solver). `none` = single-stage (solver alone), `teacher` = the "
             "solver endpoint's own decomposition (QG prompt).", "", markdown_table(runs), "",
             "## 95% Wilson intervals, markers, fallbacks", "",
             "| decomposer | scored | acc paper [95% CI] | acc strict [95% CI] | acc flexible [95% CI] | "
             "no marker (paper/strict) | fell back to single-stage | few-shot items | acc paper w/o few-shot |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s, acc = r["summary"], r["summary"]["accuracy"]
        nofew = s.get("accuracy_without_few_shot", acc)["paper"]
        fb = f"{s.get('fell_back_single_stage', 0)} of {s['n']}" if r["decomposer"] != "none" else "-"
        text.append(f"| {r['decomposer']} | {s.get('scored', s['n'])} of {s['n']} | {_ci(acc['paper'])} | "
                    f"{_ci(acc['strict'])} | {_ci(acc['flexible'])} | {acc['paper']['missing_final_answer']}/"
                    f"{acc['strict']['missing_final_answer']} | {fb} | {s.get('few_shot_items', 0)} | {_ci(nofew)} |")
    for r in runs:
        k = r["summary"].get("fell_back_single_stage", 0)
        if k and r["decomposer"] != "none":
            text.append(f"\n`{r['decomposer']}` fell back to single-stage: {k} of {r['summary']['n']} problems (no "
                        f"sub-question written; the solver answered alone, as `none` does).")
    paired = paired_vs_none(runs)
    if paired:
        text += ["", "## Paired comparison against `none` (paper rule, same problems)", "",
                 "| decomposer | paired n | accuracy - none | only none right | only this right | McNemar exact p |",
                 "|---|---|---|---|---|---|"]
        text += [f"| {p['decomposer']} | {p['n_paired']} | {p['delta']:+.3f} | {p['only_none_correct']} | "
                 f"{p['only_this_correct']} | {p['mcnemar_p']:.3g} |" for p in paired]
    errs = [(r["decomposer"], r["summary"]) for r in runs if r["summary"]["errors"]]
    if errs:
        text += ["", "## Errors (excluded from accuracy)", ""]
        for name, s in errs:
            reasons = "; ".join(f"{k}x {reason}" for reason, k in s.get("error_reasons", []))
            text.append(f"- `{name}`: {s['errors']} of {s['n']} failed. Top reasons: {reasons}")
    text += ["", "Per-sample results: `samples_<decomposer>.jsonl` (lm-eval's layout); versions, git commit, date and "
             "the full config: `results.json`.", "",
             "![accuracy vs cost](accuracy_vs_cost.png)", "", "![number of sub-questions](subquestions_hist.png)", ""]
    return "\n".join(text)


def place_labels(ax, points: list[tuple[float, float]], labels: list[str], fontsize: int = 7) -> list:
    """Annotate points so that no two labels overprint: each label starts at a small offset from its point and
    moves down in steps of its own height until its box overlaps no label placed before it (deterministic: points
    are placed in order of x, then y, then label)."""
    from matplotlib.text import Text

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    placed_boxes, texts = [], []
    for i in sorted(range(len(points)), key=lambda k: (points[k][0], points[k][1], labels[k])):
        x, y = points[i]
        dy = 3.0
        for _ in range(200):
            t = ax.annotate(labels[i], (x, y), fontsize=fontsize, xytext=(4, dy), textcoords="offset points",
                            arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5") if dy != 3.0 else None)
            box = Text.get_window_extent(t, renderer)  # the text alone (an Annotation's box includes its arrow)
            if not any(box.overlaps(b) for b in placed_boxes):
                break
            t.remove()
            dy -= box.height * 72.0 / fig.dpi + 1.0
        placed_boxes.append(box)
        texts.append(t)
    return texts


def report_figures(runs: list[dict]) -> dict:
    """The report's matplotlib figures {file name: Figure}; each carries the offline caveat when the replies came
    from the replay teacher server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caveat = "OFFLINE replay teacher: accuracy measures no decomposer" if is_offline(runs) else None
    figs = {}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    pts, labels = [], []
    for r in runs:
        s = r["summary"]
        x, y = s["usage"]["total"]["per_problem_cost_usd"], s["accuracy"]["paper"]["accuracy"]
        lo, hi = s["accuracy"]["paper"].get("ci95", (y, y))
        ax.errorbar([x], [y], yerr=[[max(0.0, y - lo)], [max(0.0, hi - y)]], fmt="o", ms=5, capsize=3, lw=0.8)
        pts.append((x, y))
        labels.append(f"{r['decomposer']} / {r['solver']}")
    ax.set_xlabel("$ per problem (decompose + solve)")
    ax.set_ylabel("accuracy (paper rule, 95% Wilson CI)")
    ax.set_title("accuracy vs cost")
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.06 if caveat else 0, 1, 1))
    place_labels(ax, pts, labels)
    figs["accuracy_vs_cost.png"] = fig

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    counts_all = [[len(it.sub_questions) for it in r["items"]] for r in runs]
    top = max([max(c) for c in counts_all if c] + [1])
    bins = [b - 0.5 for b in range(0, top + 2)]
    ax.hist(counts_all, bins=bins, label=[f"{r['decomposer']} / {r['solver']}" for r in runs])
    ax.set_xticks(range(0, top + 1))
    ax.set_xlabel("number of sub-questions")
    ax.set_ylabel("problems")
    ax.set_title("sub-questions per problem")
    ax.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0.06 if caveat else 0, 1, 1))
    figs["subquestions_hist.png"] = fig
    if caveat:
        for f in figs.values():
            f.text(0.5, 0.01, caveat, ha="center", va="bottom", fontsize=8, color="firebrick")
    return figs


def plot_report(runs: list[dict]) -> dict[str, bytes]:
    import io

    import matplotlib.pyplot as plt

    pngs = {}
    for name, fig in report_figures(runs).items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        pngs[name] = buf.getvalue()
    return pngs


# ---------------------------------------------------------------- the batch job (Ray Data)


class EvalConfig(BaseModel):
    """`subq eval`: evaluate decomposer x solver pairs over a split and write a report directory."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field("gsm8k:test", description="Split name (gsm8k:test, gsm8k-ai-subq:test) or a .jsonl/.json/.parquet path or URI.")
    limit: Optional[int] = Field(None, gt=0, description="Evaluate the first N problems only.")
    out: str = Field(..., description="Report directory (local path or pyarrow filesystem URI).")
    decomposers: list[str] = Field(default_factory=lambda: ["none"], description="'none' (single-stage), 'teacher' (the solver endpoint's QG), or NAME=CHECKPOINT_DIR / CHECKPOINT_DIR (distilled).")
    solver: SolverSettings = Field(default_factory=SolverSettings, description="The solver (answerer).")
    decomposer: DecomposerSettings = Field(default_factory=DecomposerSettings, description="Decoding settings for distilled decomposers (path comes from `decomposers`).")
    batch_size: int = Field(8, gt=0, description="Problems per Ray Data batch (decomposer batch size).")
    concurrency: int = Field(8, gt=0, description="Solver calls in flight per solver actor.")
    num_actors: int = Field(1, gt=0, description="Ray Data actors per stage.")
    decomposer_num_gpus: float = Field(0.0, ge=0, description="GPUs each distilled-decomposer actor reserves (as serving's decomposer_num_gpus); > 0 puts the model on cuda.")
    cache_dir: Optional[str] = Field(None, description="Durable cache of solver replies (default <out>/cache): a re-run, or a resumed killed run, only calls what is not cached.")
    exclude_few_shot: bool = Field(False, description="Drop the GSM8K test problems the paper's prompts quote as few-shot examples (kept and marked by default, as the release kept them).")


    @model_validator(mode="after")
    def _device_follows_gpus(self) -> "EvalConfig":
        follow_reserved_gpus(self.decomposer, self.decomposer_num_gpus)  # as serving
        return self


def decompose_resources(cfg: EvalConfig, kind: str) -> dict:
    """What one decompose-stage actor reserves: a distilled model 1 CPU + decomposer_num_gpus GPUs; the teacher
    and single-stage kinds only make API calls (a quarter CPU)."""
    if kind != "distilled":
        return {"num_cpus": 0.25}
    return {"num_cpus": 1, **({"num_gpus": cfg.decomposer_num_gpus} if cfg.decomposer_num_gpus else {})}


def parse_decomposer_spec(spec: str) -> tuple[str, Optional[str]]:
    """'none' | 'teacher' | 'NAME=PATH' | 'PATH' -> (name, path or None)."""
    if spec in ("none", "teacher"):
        return spec, None
    name, _, path = spec.partition("=") if "=" in spec else (os.path.basename(spec.rstrip("/")) or spec, "", spec)
    if not path:
        raise ConfigError(f"{spec!r} is not 'none', 'teacher', NAME=PATH or a checkpoint directory", field="decomposers")
    if "://" not in path and not os.path.isdir(path):
        raise ConfigError(f"checkpoint directory {path!r} does not exist", field="decomposers")
    return name, path


class _DecomposeStage:
    """Ray Data stage 1: decompose a batch (distilled model batched; teacher calls concurrently)."""

    def __init__(self, kind: str, name: str, settings: dict, solver: dict, concurrency: int):
        self.kind, self.name = kind, name
        self.sem_n = concurrency
        self.loop = asyncio.new_event_loop()
        if kind == "distilled":
            self.local = LocalDecomposer(DecomposerSettings(**settings))
        elif kind == "teacher":
            self.solver = Solver(SolverSettings(**solver))

    def __call__(self, batch: dict) -> dict:
        items = [ItemResult.from_dict(json.loads(x)) for x in batch["item"]]
        out = []
        if self.kind == "none":
            out = items
        elif self.kind == "distilled":
            try:
                decs = self.local.decompose_batch([it.problem for it in items])
                out = [_with_decomposition(it, d) for it, d in zip(items, decs)]
            except Exception as e:  # a broken batch is recorded per item, never lost
                out = [fail_item(it, "decompose", f"{type(e).__name__}: {e}") for it in items]
        else:
            out = self.loop.run_until_complete(self._teacher(items))
        return {"item": [json.dumps(it.to_dict()) for it in out]}

    async def _teacher(self, items):
        sem = asyncio.Semaphore(self.sem_n)

        async def one(it):
            async with sem:
                try:
                    return _with_decomposition(it, await self.solver.decompose(it.problem))
                except Exception as e:  # noqa: BLE001 - recorded per item, never lost
                    return fail_item(it, "decompose", str(e) or type(e).__name__)

        return await asyncio.gather(*(one(it) for it in items))


def _with_decomposition(item: ItemResult, d: Decomposition) -> ItemResult:
    item.sub_questions, item.decomposition_text = list(d.questions), d.text
    item.usage["decompose"] = d.usage.to_dict()
    return item


class _SolveStage:
    """Ray Data stage 2: the solver answers each item's sub-questions (many calls in flight); then scoring."""

    def __init__(self, solver: dict, concurrency: int):
        self.solver = Solver(SolverSettings(**solver))
        self.sem_n = concurrency
        self.loop = asyncio.new_event_loop()

    def __call__(self, batch: dict) -> dict:
        items = [ItemResult.from_dict(json.loads(x)) for x in batch["item"]]
        out = self.loop.run_until_complete(self._solve(items))
        return {"item": [json.dumps(it.to_dict()) for it in out]}

    async def _solve(self, items):
        sem = asyncio.Semaphore(self.sem_n)

        async def one(it: ItemResult):
            if it.error:
                return it
            async with sem:
                try:
                    ans = await self.solver.answer(it.problem, it.sub_questions)
                except Exception as e:  # noqa: BLE001 - recorded per item, never lost
                    return fail_item(it, "solve", str(e) or type(e).__name__)
            return finish_item(it, None, ans)

        return await asyncio.gather(*(one(it) for it in items))


def failure_verdict(runs: list[dict], out: str) -> tuple[Optional[str], Optional[str]]:
    """(fatal, warning): fatal when every item of every run failed (one line naming the most common cause);
    a warning with the count, where the reasons are and the 3 most common ones when some failed."""
    items = [it for r in runs for it in r["items"]]
    failed = [it for it in items if it.error]
    if not failed:
        return None, None
    where = storage.join(out, "results.json")
    top = error_reasons(failed)
    if len(failed) == len(items):
        return (f"every item failed ({len(failed)} of {len(items)}); cause: {top[0][0]} (all reasons in {where})",
                None)
    reasons = "; ".join(f"{k}x {reason}" for reason, k in top)
    return None, (f"warning: {len(failed)} of {len(items)} items failed (excluded from accuracy; reasons in {where}); "
                  f"most common: {reasons}")


def _init_ray() -> None:
    """Join RAY_ADDRESS (a cluster job) or start a local Ray. A local start that misses Ray's fixed 30 s window for
    the raylet (a saturated machine) is tried again, twice."""
    import ray

    if ray.is_initialized():
        return
    from cluster.connect import init_ray

    for attempt in range(3):
        try:  # RAY_ADDRESS (a cluster job) is joined; the local-only options are dropped then
            init_ray(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                     object_store_memory=200 * 1024**2, log_to_driver=False)
            return
        except Exception as e:  # noqa: BLE001 - only the start-up timeout is retried
            ray.shutdown()
            if "timed out during startup" not in str(e) or attempt == 2:
                raise


def run_eval(cfg: EvalConfig, progress: Callable[[str], None] = print) -> dict:
    """The batch job: for each decomposer spec, Ray Data over the split -> decompose -> solve -> score; then the
    report directory. Solver calls go through the durable request cache (<out>/cache by default), so a re-run
    pays nothing and a killed run resumes with only the unfinished calls. Returns {"out", "runs", "files"};
    raises SubqError (after writing the report) when every item failed."""
    import ray

    from subq import console
    from subq.problems import load_problems

    problems = load_problems(cfg.data, cfg.limit)
    if cfg.exclude_few_shot:
        problems = [p for p in problems if not p.is_few_shot_example]
    specs = [parse_decomposer_spec(s) for s in cfg.decomposers]
    cfg.solver.price()  # unknown price -> ConfigError before any work
    check_solver(cfg.solver)  # no key / endpoint down -> one error line before any work
    solver = cfg.solver.model_copy(update={"cache_dir": cfg.solver.cache_dir or cfg.cache_dir
                                           or storage.join(cfg.out, "cache")})
    _init_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    runs = []
    for name, path in specs:
        kind = name if path is None else "distilled"
        t0 = time.perf_counter()
        seed = [json.dumps(new_item(i, p, name, solver.name).to_dict()) for i, p in enumerate(problems)]
        ds = ray.data.from_items([{"item": s} for s in seed], override_num_blocks=max(1, len(seed) // cfg.batch_size))
        dec_settings = cfg.decomposer.model_copy(update={"path": path, "name": name}).model_dump()
        ds = ds.map_batches(_DecomposeStage, batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                            fn_constructor_kwargs=dict(kind=kind, name=name, settings=dec_settings,
                                                       solver=solver.model_dump(), concurrency=cfg.concurrency),
                            **decompose_resources(cfg, kind))
        ds = ds.map_batches(_SolveStage, batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                            fn_constructor_kwargs=dict(solver=solver.model_dump(), concurrency=cfg.concurrency),
                            num_cpus=0.25)
        items: list[ItemResult] = []
        correct = cost = 0.0
        with console.progress_bar(total=len(seed), desc=f"eval {name}", unit="item") as bar:
            for row in ds.iter_rows():  # streaming: items arrive as their batches finish
                it = ItemResult.from_dict(json.loads(row["item"]))
                items.append(it)
                correct += bool(it.scores and it.scores["paper"]["correct"])
                cost += sum(u.get("cost_usd", 0.0) for u in it.usage.values())
                scored = sum(1 for x in items if x.scores)
                bar.set_postfix_str(f"acc {correct / scored if scored else 0:.3f} ${cost:.4f} "
                                    f"errors {len(items) - scored}", refresh=False)
                bar.update(1)
        items.sort(key=lambda i: i.index)
        summary = summarize_items(items)
        summary["wall_s"] = time.perf_counter() - t0
        runs.append({"decomposer": name, "solver": solver.name, "summary": summary, "items": items})
        fb = (f" fell back to single-stage: {summary['fell_back_single_stage']} of {summary['n']}"
              if name != "none" else "")
        progress(f"eval {name} x {solver.name}: n={summary['n']} acc(paper)={summary['accuracy']['paper']['accuracy']:.3f} "
                 f"cost=${summary['usage']['total']['cost_usd']:.5f} solver calls={summary['usage']['solve']['calls']} "
                 f"errors={summary['errors']}{fb}")
    if is_offline(runs):
        progress(f"warning: {OFFLINE_CAVEAT}")
    config = cfg.model_dump()
    files = write_report(cfg.out, runs, config)
    fatal, warning = failure_verdict(runs, cfg.out)
    if fatal:
        raise SubqError(fatal)
    if warning:
        progress(warning)
    return {"out": cfg.out, "files": files, "offline": is_offline(runs),
            "runs": [{"decomposer": r["decomposer"], "solver": r["solver"], "summary": r["summary"]} for r in runs]}
