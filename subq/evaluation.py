"""One problem through decomposer -> solver, as a record: stages, usage, the per-item result and its scoring,
summaries (accuracy per mode with Wilson intervals, tokens and $ per stage) and the paper's raw file. Shared by
the Serve app's `/v1/evaluations` and `subq eval`, so both agree."""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from subq.costs import Price
from subq.parsers import format_subquestions, parse_answers
from subq.problems import Problem
from subq.schema import SubQRow, SubQuestionSet, write_paper
from subq.scoring import MODES, Score, gold_number, score, summarize, wilson_interval

STAGES = ("decompose", "solve")
DOC_ANSWER = re.compile(r"the answer is:?\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)

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

def stage_usage(model: str, price: Price, prompt_tokens: int, completion_tokens: int, t0: float, calls: int = 1,
           cost: Optional[float] = None) -> StageUsage:
    return StageUsage(model=model, prompt_tokens=int(prompt_tokens), completion_tokens=int(completion_tokens),
                      cost_usd=price.cost(prompt_tokens, completion_tokens) if cost is None else float(cost),
                      latency_s=time.perf_counter() - t0, calls=calls)
