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
import time
from typing import Callable, Optional


from actors.solver import Solver, check_solver
from subq import storage
from subq.costs import Price as Price, PriceTable as PriceTable
from subq.errors import ConfigError, SubqError
from subq.evaluation import (
    Decomposition,
    ItemResult,
    error_reasons,
    fail_item,
    finish_item,
    new_item,
    summarize_items,
)
from subq.parsers import format_subquestions as format_subquestions, parse_answers as parse_answers, parse_doc_subquestions as parse_doc_subquestions, parse_subquestions as parse_subquestions
from subq.problems import Problem as Problem
from subq.prompts import messages as messages, template_for as template_for
from subq.report import OFFLINE_CAVEAT, is_offline, write_report
from subq.schema import SubQRow as SubQRow, SubQuestionSet as SubQuestionSet, write_paper as write_paper
from subq.scoring import MODES as MODES, Score as Score, gold_number as gold_number, mcnemar_exact as mcnemar_exact, score as score, summarize as summarize, wilson_interval as wilson_interval
from subq.settings import DecomposerSettings, SolverSettings
from pipelines.evaluate_config import EvalConfig as EvalConfig
from training.decomposer import LocalDecomposer

# ---------------------------------------------------------------- the batch job (Ray Data)


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

    def __init__(self, kind: str, name: str, settings: dict, solver: dict, concurrency: int,
                 api_key_ref: Optional[list] = None):
        self.kind, self.name = kind, name
        self.sem_n = concurrency
        self.loop = asyncio.new_event_loop()
        if kind == "distilled":
            self.local = LocalDecomposer(DecomposerSettings(**settings))
        elif kind == "teacher":
            self.solver = Solver(SolverSettings(**solver), api_key_ref=api_key_ref)

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

    def __init__(self, solver: dict, concurrency: int, api_key_ref: Optional[list] = None):
        self.solver = Solver(SolverSettings(**solver), api_key_ref=api_key_ref)
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
    # local paths absolute: the stages' actors on a joined cluster do not run in this working directory
    solver = cfg.solver.model_copy(update={"cache_dir": storage.absolute(cfg.solver.cache_dir or cfg.cache_dir
                                                                         or storage.join(cfg.out, "cache")),
                                           "local_path": storage.absolute(cfg.solver.local_path)})
    from cluster.connect import ray_session

    # RAY_ADDRESS (a cluster job) is joined, the local-only options dropped then; disconnected at the end
    with ray_session(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                     object_store_memory=200 * 1024**2, log_to_driver=False):
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        # the solver key reaches the stages' actors through the object store (a joined cluster's workers do not
        # have this shell's environment; never in task specs, runtime_env or logs), as generation's teacher key
        from cluster.submit import share_key

        key_ref = share_key(solver.api_key_env) if solver.backend == "openai" else None
        runs = []
        for name, path in specs:
            kind = name if path is None else "distilled"
            t0 = time.perf_counter()
            seed = [json.dumps(new_item(i, p, name, solver.name).to_dict()) for i, p in enumerate(problems)]
            ds = ray.data.from_items([{"item": s} for s in seed], override_num_blocks=max(1, len(seed) // cfg.batch_size))
            dec_settings = cfg.decomposer.model_copy(update={"path": storage.absolute(path), "name": name}).model_dump()
            ds = ds.map_batches(_DecomposeStage, batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                                fn_constructor_kwargs=dict(kind=kind, name=name, settings=dec_settings,
                                                           solver=solver.model_dump(), concurrency=cfg.concurrency,
                                                           api_key_ref=key_ref),
                                **decompose_resources(cfg, kind))
            ds = ds.map_batches(_SolveStage, batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                                fn_constructor_kwargs=dict(solver=solver.model_dump(), concurrency=cfg.concurrency,
                                                           api_key_ref=key_ref),
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
