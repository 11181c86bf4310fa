"""`subq demo`: the whole distillation loop, end to end, on an embedded local Ray, offline, with no key.

    subq demo                                   # under 6 minutes on 2 cores: replay teacher, tiny GPT-2, BC, FBC, ILQL
    subq demo --algos bc,filtered_bc,ilql --problems 64 --steps 120
    subq demo --base-url https://api.openai.com/v1 --teacher-model gpt-4o-mini --model gpt2-local-dir \\
        --problems 500 --eval-problems 200 --max-cost-usd 5      # the same loop as a real run (key: OPENAI_API_KEY)

Stages (one line each on stdout; the generation job's progress line on stderr):

1. **ray**      start a local Ray (or join `RAY_ADDRESS` / `--ray-address`);
2. **teacher**  start the local teacher server in replay mode (pipelines.teacher_server), unless `--base-url`;
3. **generate** GSM8K-AI-SubQ rows for the first `--problems` problems of `--input` through `--actors` rate-limited
   teacher actors (pipelines.generate: Ray Data, cluster limiter, durable cache) -> OUT/generate/;
4. **model**    a tiny random-init GPT-2 + locally trained tokenizer (`subq init-model`) unless `--model`;
5. **train**    each of `--algos` with Ray Train + DeepSpeed (training.train); FBC and ILQL start from the BC
   checkpoint as in the paper -> OUT/runs/<algo>-<hash of data, base model and settings>/;
6. **serve**    the Serve app (pipelines.serve) for every distilled decomposer at once (one application each, at
   `/<label>`), each beside the solver (the teacher endpoint);
7. **evaluate** `POST /v1/evaluations` on the next `--eval-problems` problems of `--input` (held out: never
   generated nor trained on) for single-stage (`none`), the teacher's decomposition (`teacher`) and each distilled
   decomposer, all running at once -> OUT/eval/ (results.json, report.md, PNGs, paper_raw files);
8. **report**   OUT/report.md + OUT/report.json: rows, tokens, $, 429s, training end points, accuracy per scoring mode,
   tokens/$ per stage, and what ran offline (so what the numbers mean).

Resume: everything lands under OUT. Re-running the same command re-uses generated rows and cached teacher replies
(only calls in flight when it stopped are sent again), finished training runs (a run with a checkpoint but no
final model is resumed from it) and a finished evaluation of the same models and problems. Ctrl-C stops cleanly
(exit 130) and says where to resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from subq.errors import ConfigError, SubqError

ALGOS = ("bc", "filtered_bc", "ilql")
LOCAL_KEY_ENV, LOCAL_KEY = "SUBQ_DEMO_LOCAL_KEY", "subq-demo-local"  # offline: the local server's (unchecked) key;
# a real key the user has exported is never sent to the local server


class DemoConfig(BaseModel):
    """Everything `subq demo` needs; YAML keys and CLI flags have the same names."""

    model_config = ConfigDict(extra="forbid")

    out: str = Field("subq-demo", description="Output directory (local): generate/, model/, runs/, eval/, report.md.")
    input: str = Field("gsm8k:test", description="Problems: the first `problems` are generated and trained on, the next "
                       "`eval_problems` evaluated. gsm8k:test is what the replay teacher has recordings for.")
    problems: int = Field(48, ge=4, description="Problems to generate GSM8K-AI-SubQ rows for (the training set).")
    eval_problems: int = Field(16, ge=1, description="Held-out problems evaluated through the Serve endpoint.")
    # teacher (generation) and solver (evaluation)
    base_url: Optional[str] = Field(None, description="Real OpenAI-compatible teacher endpoint. None: start the local "
                                    "replay teacher server (offline, no key).")
    teacher_model: str = Field("gpt-3.5-turbo", description="Teacher model (paper: gpt-3.5-turbo).")
    api_key_env: str = Field("OPENAI_API_KEY", description="NAME of the env var holding the teacher/solver key.")
    solver_model: Optional[str] = Field(None, description="Solver model for evaluation (default: teacher_model).")
    solver_base_url: Optional[str] = Field(None, description="Solver endpoint (default: the teacher's).")
    n_sets: int = Field(3, ge=1, description="Sub-question sets per problem (paper: 3).")
    n_feedback: int = Field(3, ge=0, description="Feedback calls per set (paper: 3).")
    rpm: Optional[float] = Field(3000.0, gt=0, description="Cluster-wide requests/minute to the teacher (generation) "
                                 "and the solver (evaluation); the replay server enforces it with 429 + Retry-After.")
    tpm: Optional[float] = Field(None, gt=0, description="Cluster-wide teacher tokens/minute.")
    actors: str = Field("2,2", description="Teacher actor pool MIN,MAX (Ray Data autoscaling).")
    batch_size_generate: int = Field(4, ge=1, description="Problems per generation batch (one Parquet part each).")
    max_cost_usd: Optional[float] = Field(None, gt=0, description="Stop generation cleanly after this much spend.")
    teacher_latency_s: float = Field(0.1, ge=0, description="Replay server: mean reply latency (seconds).")
    # decomposer training
    model: Optional[str] = Field(None, description="Base decomposer (HF causal LM directory). None: `subq init-model`.")
    algos: list[Literal["bc", "filtered_bc", "ilql"]] = Field(["bc", "filtered_bc", "ilql"], description="Algorithms "
                                                              "to train, in order; FBC/ILQL start from BC when BC is "
                                                              "listed. ILQL runs are labelled ilql-sparse / ilql-dense.")
    ilql_rewards: Literal["sparse", "dense"] = Field("dense", description="ILQL rewards.")
    steps: int = Field(60, ge=1, description="Optimizer steps for BC; FBC and ILQL get half (they start from BC). 60 keeps "
                       "the whole demo within about 6 minutes on 2 CPU cores; raise it for better decomposers.")
    batch_size: int = Field(8, ge=1, description="Micro batch per training worker.")
    lr: float = Field(1e-3, gt=0, description="Learning rate (higher than the paper's 1e-4: a tiny model, few steps).")
    num_workers: int = Field(2, ge=1, description="Ray Train workers.")
    use_gpu: bool = Field(False, description="Train and serve on GPUs.")
    deepspeed: str = Field("zero2", description="DeepSpeed preset (zero0..zero3) or JSON config path.")
    max_new_tokens: int = Field(256, ge=1, description="Decomposer tokens per decomposition (validation and serving); "
                                "the release allowed the reference length + 200 (subq.textformat).")
    beta: Optional[float] = Field(None, description="ILQL guidance weight when serving an ILQL decomposer (None: the checkpoint's own ilql.beta).")
    # cluster
    ray_address: Optional[str] = Field(None, description="Join this Ray cluster (default: RAY_ADDRESS, else start one).")
    port: int = Field(0, ge=0, le=65535, description="Serve HTTP port on 127.0.0.1 (0: a free one).")

    @field_validator("algos", mode="before")
    @classmethod
    def _algos(cls, v):
        if isinstance(v, str):
            v = [a.strip() for a in v.split(",") if a.strip()]
        if not v:
            raise ValueError(f"name at least one of {', '.join(ALGOS)}")
        return v

    @field_validator("actors")
    @classmethod
    def _actors(cls, v: str) -> str:
        from pipelines.generate import GenerateConfig

        from pydantic import ValidationError

        try:
            GenerateConfig.model_validate({"output": "x", "actors": v})  # the generation job's own rule (MIN,MAX)
        except ValidationError as e:
            raise ValueError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return v

    @property
    def solver(self) -> str:
        return self.solver_model or self.teacher_model

    @property
    def offline(self) -> bool:
        return self.base_url is None

    @property
    def key_env(self) -> str:
        return LOCAL_KEY_ENV if self.offline else self.api_key_env


class Stopped(Exception):
    """Ctrl-C / SIGTERM during a stage."""


def _say(msg: str) -> None:
    from subq import console

    print(msg, file=console.out(), flush=True)


def _data_hash(rows) -> str:
    return hashlib.sha256("\n".join(sorted(r.problem_id for r in rows)).encode()).hexdigest()[:8]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


class StageTimes:
    """Wall time per stage, kept in OUT/stages.json across re-runs. A stage that re-used earlier work keeps the
    time it took when it ran and is marked re-used (with the date it ran), so a resumed demo's report never passes
    a 2-second re-use off as the training time."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.prev: dict = json.loads(path.read_text())
        except (OSError, ValueError):
            self.prev = {}
        self.now: dict[str, dict] = {}

    def record(self, stage: str, took_s: float, reused: bool = False) -> dict:
        prev = self.prev.get(stage)
        if reused and prev and prev.get("ran_at"):
            entry = {"took_s": prev["took_s"], "ran_at": prev["ran_at"], "reused": True}
        else:
            entry = {"took_s": round(took_s, 2), "ran_at": time.strftime("%Y-%m-%d %H:%M:%S"), "reused": reused}
        self.now[stage] = entry
        _write_json(self.path, {**self.prev, **self.now})
        return entry

    @staticmethod
    def describe(entry: dict) -> str:
        if entry.get("reused"):
            return f"re-used (from {entry['ran_at']}, took {entry['took_s']:.0f}s)"
        return f"{entry['took_s']:.0f}s"

    def seconds(self) -> dict[str, float]:
        return {k: v["took_s"] for k, v in self.now.items()}


# ---------------------------------------------------------------- stages


def split_problems(cfg: DemoConfig):
    """(training problems, held-out problems): the first `problems` and the next `eval_problems` of the input, by
    content id, disjoint (the held-out set goes to OUT/heldout.jsonl, GSM8K fields, for the endpoint)."""
    from subq.problems import load_problems

    allp = load_problems(cfg.input, cfg.problems + cfg.eval_problems)
    if len(allp) < cfg.problems + cfg.eval_problems:
        raise ConfigError(f"{cfg.input} has {len(allp)} problems; problems + eval_problems = "
                          f"{cfg.problems + cfg.eval_problems}", field="eval_problems")
    train, held = allp[:cfg.problems], allp[cfg.problems:]
    train_ids = {p.problem_id for p in train}
    held = [p for p in held if p.problem_id not in train_ids]  # duplicates in a split never leak into evaluation
    return train, held


def stage_generate(cfg: DemoConfig, out: Path, teacher_url: str) -> dict:
    from pipelines.generate import GenerateConfig, run_generate

    gcfg = GenerateConfig(input=cfg.input, output=str(out / "generate"), model=cfg.teacher_model, base_url=teacher_url,
                          api_key_env=cfg.key_env, n_sets=cfg.n_sets, n_feedback=cfg.n_feedback, rpm=cfg.rpm,
                          tpm=cfg.tpm, actors=cfg.actors, batch_size=cfg.batch_size_generate, limit=cfg.problems,
                          max_cost_usd=cfg.max_cost_usd, progress_interval_s=5.0, max_concurrency=16)
    summary = run_generate(gcfg)
    if summary["rows_total"] < 4:
        raise SubqError(f"only {summary['rows_total']} rows were generated (failures: {summary['failures_open']}); "
                        f"see {out / 'generate' / 'failures.jsonl'}", field="problems")
    return summary


def stage_model(cfg: DemoConfig, out: Path) -> str:
    if cfg.model:
        return cfg.model
    path = out / "model"
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return str(path)
    from training.init_model import create_tiny_model

    tmp = out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    create_tiny_model(str(tmp), n_layer=2, n_embd=128, n_head=4, vocab_size=2048)
    shutil.rmtree(path, ignore_errors=True)
    tmp.replace(path)  # complete or absent: a re-run after Ctrl-C never sees half a model
    return str(path)


def stage_train(cfg: DemoConfig, out: Path, model: str, data: str, data_hash: str,
                say: Callable[[str], None], times: Optional[StageTimes] = None) -> dict:
    """Train every algo (skipping finished runs, resuming interrupted ones); returns {algo: run info}."""
    from training.config import TrainConfig
    from training.train import run_train

    runs: dict[str, dict] = {}
    storage_path = out / "runs"
    for algo in cfg.algos:
        label = f"ilql-{cfg.ilql_rewards}" if algo == "ilql" else algo  # reports never leave sparse/dense implicit
        init_from = runs["bc"]["final_dir"] if algo != "bc" and "bc" in runs else None
        steps = cfg.steps if algo == "bc" or init_from is None else max(1, cfg.steps // 2)
        # a run is re-used only for the same data, base model and settings: they name its directory
        settings = {"data": data_hash, "model": str(Path(model).resolve()), "init_from": init_from, "steps": steps,
                    "lr": cfg.lr, "batch_size": cfg.batch_size, "num_workers": cfg.num_workers,
                    "deepspeed": cfg.deepspeed, "rewards": cfg.ilql_rewards if algo == "ilql" else None}
        name = f"{algo}-{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]}"
        rd = storage_path / name
        final = rd / "final"
        if (final / "config.json").is_file():
            entry = times.record(f"train {label}", 0.0, reused=True) if times else None
            say(f"      {label}: " + (StageTimes.describe(entry) if entry else "finished earlier, re-used") + f" ({final})")
        else:
            resume = rd.exists() and any(rd.glob("checkpoint_*"))
            if rd.exists() and not resume:
                shutil.rmtree(rd)  # started but never checkpointed: nothing to keep
            tcfg = TrainConfig(
                algo=algo, rewards=cfg.ilql_rewards, data=data, model=model, init_from=init_from, steps=steps,
                batch_size=cfg.batch_size, lr=cfg.lr, num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                deepspeed=cfg.deepspeed, storage_path=str(storage_path), name=name, resume=resume,
                checkpoint_every=max(1, steps // 2), keep_checkpoints=1, log_every=max(1, steps // 6),
                eval_every=max(1, steps // 2), eval_problems=4, eval_max_new_tokens=cfg.max_new_tokens,
                val_fraction=0.1, max_length=384, max_failures=1)
            t0 = time.time()
            say(f"      {label}: {steps} steps, {cfg.num_workers} Ray Train workers, DeepSpeed {cfg.deepspeed}"
                + (f", from {Path(init_from).parent.name}" if init_from else "") + (", resuming" if resume else ""))
            with _progress_bar(f"      {label}", steps, resumed=_last_step(rd), step_of=lambda: _last_step(rd)):
                res = run_train(tcfg, ray_init={})
            if times:
                times.record(f"train {label}", time.time() - t0)
            say(f"      {label}: done in {time.time() - t0:.0f}s -> {res['final_dir']}")
        history = json.loads((rd / "metrics.json").read_text()) if (rd / "metrics.json").is_file() else []
        runs[label] = {"algo": algo, "name": name, "run_dir": str(rd), "final_dir": str(final), "steps": steps,
                      "init_from": init_from, "history": history, "end": _end_points(history)}
    return runs


def _last_step(run_dir: Path) -> int:
    """The last step rank 0 logged to metrics.json (0 before the first log)."""
    try:
        return int(json.loads((run_dir / "metrics.json").read_text())[-1]["step"])
    except (OSError, ValueError, LookupError, TypeError):
        return 0


@contextlib.contextmanager
def _progress_bar(desc: str, total: int, step_of: Callable[[], int], resumed: int = 0, every_s: float = 1.0):
    """A tqdm bar on stderr, advanced from `step_of()` by a background thread while the block runs."""
    from subq import console

    bar = console.progress_bar(total=total, initial=resumed, desc=desc, unit="step")
    stop = threading.Event()

    def poll():
        while not stop.wait(every_s):
            bar.update(max(0, min(total, step_of()) - bar.n))

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        yield bar
    finally:
        stop.set()
        t.join()
        bar.update(max(0, min(total, step_of()) - bar.n))
        bar.close()


def _end_points(history: list[dict]) -> dict:
    """First and last training loss, and the last validation metrics."""
    if not history:
        return {}
    first, last = history[0], history[-1]
    val = next((h for h in reversed(history) if "val_loss" in h), {})
    keys = ("val_loss", "val_bleu", "val_num_subq", "val_ref_num_subq", "val_parsed_frac")
    return {"step": last.get("step"), "loss_first": first.get("loss"), "loss_last": last.get("loss"),
            **{k: val.get(k) for k in keys if k in val}}


def _eval_fingerprint(cfg: DemoConfig, runs: dict, held: list) -> str:
    return hashlib.sha256(json.dumps(
        {"held": [p.problem_id for p in held], "solver": cfg.solver, "solver_url": cfg.solver_base_url or cfg.base_url,
         "decomposers": {a: r["name"] for a, r in runs.items()}, "beta": cfg.beta,
         "max_new_tokens": cfg.max_new_tokens}, sort_keys=True).encode()).hexdigest()[:16]


def reusable_evaluation(cfg: DemoConfig, out: Path, runs: dict, held: list) -> Optional[dict]:
    """A finished evaluation of the same held-out problems, models and solver (it paid for its solver calls)."""
    from subq.evaluation import ItemResult

    done = out / "eval" / "results.json"
    try:
        prev = json.loads(done.read_text())
    except (OSError, ValueError):
        return None
    if prev.get("config", {}).get("fingerprint") != _eval_fingerprint(cfg, runs, held):
        return None
    runs_out = [{"decomposer": r["decomposer"], "solver": r["solver"], "summary": r["summary"],
                 "items": [ItemResult.from_dict(d) for d in r["items"]],
                 "evaluation_id": prev["config"]["evaluation_ids"].get(r["decomposer"])} for r in prev["runs"]]
    return {"runs": runs_out, "written": {}}


def stage_serve_and_evaluate(cfg: DemoConfig, out: Path, runs: dict, held: list, solver_url: Optional[str],
                             say: Callable[[str], None]) -> dict:
    """Serve every distilled decomposer at once (one Serve application each, `/<label>` on one port, deployed
    together) and evaluate through POST /v1/evaluations: single-stage (`none`) and the teacher's decomposition
    (`teacher`) once, and each distilled decomposer, all five evaluations running at the same time. A finished
    evaluation of the same held-out problems, models and solver is re-used (it paid for its solver calls)."""
    from subq.report import write_report
    from subq.settings import DecomposerSettings, SolverSettings
    from pipelines.serve import ServeConfig, start_serve_many
    from pipelines.teacher_server import free_port

    # the solver's calls go through the same cluster limiter as generation's (one per endpoint and model)
    solver = SolverSettings(name=cfg.solver, base_url=solver_url, rpm=cfg.rpm, tpm=cfg.tpm,
                            api_key_env=cfg.api_key_env if cfg.solver_base_url else cfg.key_env)
    fingerprint = _eval_fingerprint(cfg, runs, held)
    port = cfg.port or free_port()
    heldout = str(out / "heldout.jsonl")
    # the replicas share the machine: each reserves half a CPU (one decoding thread) and a share of the GPU
    share = {"decomposer_num_cpus": 0.5, **({"decomposer_num_gpus": 1.0 / len(runs)} if cfg.use_gpu else {})}
    t0 = time.time()
    configs = [ServeConfig(host="127.0.0.1", port=port, app_name=f"subq-demo-{algo}", route_prefix=f"/{algo}",
                           decomposer=DecomposerSettings(path=runs[algo]["run_dir"], name=algo,  # its best/ (val BLEU)
                                                         max_new_tokens=cfg.max_new_tokens, beta=cfg.beta,
                                                         device="cuda" if cfg.use_gpu else "cpu"),
                           solver=solver, decomposer_max_replicas=1, solver_max_replicas=1, **share,
                           eval_concurrency=8, datasets={"heldout": heldout}, results_root=str(out / "serve-evaluations"))
               for algo in runs]
    bases = dict(zip(runs, start_serve_many(configs, ray_init={})))
    say(f"      serving {', '.join(runs)} (one application each) + solver {cfg.solver} at "
        f"http://127.0.0.1:{port} ({time.time() - t0:.0f}s)")
    first = next(iter(runs))
    plan = [("none", "none", bases[first]), ("teacher", "teacher", bases[first])] + [
        (algo, "distilled", bases[algo]) for algo in runs]
    started = [_start_evaluation(base, "heldout", len(held), name, kind) for name, kind, base in plan]  # all at once
    results = [_follow_evaluation(base, eid, t, len(held), name, cfg.solver, say)
               for (name, _, base), (eid, t) in zip(plan, started)]
    config = {"fingerprint": fingerprint, "heldout": heldout, "solver": solver.model_dump(),
              "decomposers": {a: runs[a]["final_dir"] for a in runs},
              "evaluation_ids": {r["decomposer"]: r["evaluation_id"] for r in results}}
    written = write_report(str(out / "eval"), results, config)
    return {"runs": results, "written": written}


def _start_evaluation(base: str, dataset: str, n: int, name: str, kind: str) -> tuple[str, float]:
    """POST /v1/evaluations for `n` problems of a registered dataset; returns (evaluation id, start time)."""
    import httpx

    t0 = time.time()
    r = httpx.post(base + "/v1/evaluations", timeout=60,
                   json={"dataset": dataset, "decomposer": kind, "limit": n, "scoring_mode": "paper"})
    if r.status_code != 202:
        raise SubqError(f"POST /v1/evaluations ({name}) answered {r.status_code}: {r.text[:300]}")
    return r.json()["id"], t0


def _follow_evaluation(base: str, eid: str, t0: float, n: int, name: str, solver: str, say) -> dict:
    """Poll one evaluation to completion (a progress bar), then fetch its per-item results."""
    import httpx
    from subq import console

    from subq.evaluation import ItemResult

    with console.progress_bar(total=n, desc=f"      {name:>12}", unit="problem") as bar:
        while True:
            view = httpx.get(f"{base}/v1/evaluations/{eid}", timeout=60).json()
            bar.update(view["done"] - bar.n)
            if view["status"] != "running":
                break
            time.sleep(0.5)
    if view["status"] != "completed":
        raise SubqError(f"evaluation {eid} ({name}) {view['status']}: {view.get('error')}")
    full = httpx.get(f"{base}/v1/evaluations/{eid}", params={"items": "true"}, timeout=60).json()
    items = [ItemResult.from_dict(d) for d in full["items"]]
    if items and all(it.error for it in items):
        first = next(it for it in items if it.error)
        raise SubqError(f"every item of evaluation {eid} ({name}) failed; first, at {first.error_stage}: {first.error}")
    for it in items:
        it.decomposer = name
    acc = full["summary"]["accuracy"]
    say(f"      {name:>12} -> {solver}: paper {acc['paper']['accuracy']:.3f}  strict {acc['strict']['accuracy']:.3f}  "
        f"flexible {acc['flexible']['accuracy']:.3f}  ({len(items)} problems, {full['summary']['errors']} errors, "
        f"{full['finished'] - t0:.0f}s, {eid})")
    return {"decomposer": name, "solver": solver, "summary": full["summary"], "items": items, "evaluation_id": eid,
            "ran": [full["created"], full["finished"]]}


# ---------------------------------------------------------------- report


def _fmt(x, nd=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def write_demo_report(cfg: DemoConfig, out: Path, gen: dict, runs: dict, ev: dict, times: StageTimes,
                      this_run_s: float) -> dict:
    from subq.report import markdown_table

    this = gen["this_run"]
    spent = _spent(out)
    g = {"rows": gen["rows_total"], "failures_open": gen["failures_open"], "problems": gen["problems"],
         "teacher_calls": spent["calls"], "requests_sent_this_run": this["requests_sent"], "prompt_tokens": spent["prompt_tokens"],
         "completion_tokens": spent["completion_tokens"], "cost_usd": round(spent["cost_usd"], 6),
         "n_429": spent["n_429"], "this_run": this, "actors_used": this.get("actors_used")}
    evals = [{"decomposer": r["decomposer"], "solver": r["solver"], "evaluation_id": r["evaluation_id"],
              "accuracy": {m: r["summary"]["accuracy"][m]["accuracy"] for m in ("paper", "strict", "flexible")},
              "correct_paper": r["summary"]["accuracy"]["paper"]["correct"], "n": r["summary"]["n"],
              "usage": r["summary"]["usage"], "mean_subq": r["summary"]["sub_questions"]["mean"],
              "errors": r["summary"]["errors"], "ran": r.get("ran")} for r in ev["runs"]]
    report = {"config": cfg.model_dump(), "offline": cfg.offline, "generation": g,
              "training": {a: {k: v for k, v in r.items() if k != "history"} for a, r in runs.items()},
              "evaluation": evals, "timings_s": times.seconds(), "stages": times.now,
              "this_run_s": round(this_run_s, 2), "paths": {"eval": str(out / "eval"),
                                                                  "generate": str(out / "generate")}}
    _write_json(out / "report.json", report)

    md = ["# subq demo report", ""]
    if cfg.offline:
        md += ["**Offline run: read the accuracy column with care.** The teacher and the solver were the local replay "
               "server (`subq teacher-server`). Its sub-question sets and answers are the released ChatGPT replies "
               "of GSM8K-AI-SubQ (test split) where recorded, and labelled synthetic replies built from the GSM8K "
               "gold solutions elsewhere; every feedback vote is synthetic. Every solver reply for a problem ends "
               "with the final answer ChatGPT gave for it in the release: replayed verbatim for a recorded "
               "sub-question set, synthesised around that final answer otherwise (no sub-questions, or a set written "
               "by our decomposer). So:",
               "",
               "- the accuracy is the release's teacher accuracy on these problems, the same for every row: it is "
               "not a measurement of single-stage solving or of any decomposer;",
               "- what IS measured here: rows, calls, tokens, $ (at the price table's rates) and 429s of generation; "
               "the training curves; the decomposers' sub-questions, their counts and tokens; tokens and $ per "
               "stage in evaluation; and that every part ran on Ray (actors, Train + DeepSpeed, Serve);",
               f"- the decomposer is {'a tiny random-init GPT-2 (`subq init-model`)' if not cfg.model else cfg.model} "
               f"trained for {cfg.steps} steps on {gen['rows_total']} problems: it shows the pipeline, not the "
               "paper's result.",
               "",
               "With `--base-url` (and its key) and a real `--model`, the same command and this same report are the "
               "real experiment.", ""]
    else:
        md += [f"**Live run** against {cfg.base_url} (teacher {cfg.teacher_model}, solver {cfg.solver}); base "
               f"decomposer {cfg.model or 'tiny random-init GPT-2'}.", ""]
    md += ["## Generation (GSM8K-AI-SubQ rows)", "",
           "| rows | failures | teacher calls paid | requests sent (this run) | prompt tokens | completion tokens | $ | 429s |",
           "|---|---|---|---|---|---|---|---|",
           f"| {g['rows']}/{g['problems']} | {g['failures_open']} | {g['teacher_calls']} | {g['requests_sent_this_run']} | "
           f"{g['prompt_tokens']} | {g['completion_tokens']} | {g['cost_usd']:.4f} | {g['n_429']} |", "",
           "Calls, tokens, $ and 429s are totals over every run of this demo directory, read from the durable "
           "request cache (one record per paid reply; a resumed run adds only the calls it sent). Data: "
           "`generate/parts/` (Parquet), `generate/paper_raw.jsonl`, `generate/paper_dataset.json`.", "",
           "## Training (Ray Train + DeepSpeed)", "",
           "| algo | steps | from | loss first -> last | val loss | val BLEU | val #subq (ref) | curves |",
           "|---|---|---|---|---|---|---|---|"]
    for algo, r in runs.items():
        e = r["end"]
        md.append(f"| {algo} | {r['steps']} | {Path(r['init_from']).parent.name if r['init_from'] else 'base'} | "
                  f"{_fmt(e.get('loss_first'))} -> {_fmt(e.get('loss_last'))} | {_fmt(e.get('val_loss'))} | "
                  f"{_fmt(e.get('val_bleu'), 2)} | {_fmt(e.get('val_num_subq'), 2)} ({_fmt(e.get('val_ref_num_subq'), 2)}) | "
                  f"[metrics.png](runs/{r['name']}/metrics.png) |")
    md += ["", "## Evaluation through the Serve endpoint (`POST /v1/evaluations`, held-out problems)", "",
           markdown_table(ev["runs"]).rstrip(), "",
           "Plots: [accuracy vs cost](eval/accuracy_vs_cost.png), [sub-questions](eval/subquestions_hist.png). "
           "Per pair, `eval/<pair>.paper_raw.jsonl` re-scores with `subq score FILE --mode paper|strict|flexible`.",
           "", "## Time", "", "| stage | time |", "|---|---|",
           *[f"| {k} | {StageTimes.describe(v)} |" for k, v in times.now.items()],
           f"| this run, end to end | {this_run_s:.0f}s |", ""]
    (out / "report.md").write_text("\n".join(md))
    return report


def _spent(out: Path) -> dict:
    """Teacher calls, tokens, $ and 429s recorded in the durable cache (every paid reply, over every run)."""
    tot = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "n_429": 0}
    for f in (out / "generate" / "cache").rglob("*.json"):
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        tot["calls"] += 1
        tot["prompt_tokens"] += int(d.get("prompt_tokens", 0) or 0)
        tot["completion_tokens"] += int(d.get("completion_tokens", 0) or 0)
        tot["cost_usd"] += float(d.get("cost_usd", 0.0) or 0.0)
        tot["n_429"] += int(d.get("n_429", 0) or 0)
    return tot


def summary_table(report: dict) -> str:
    """The short table `subq demo` prints at the end."""
    g = report["generation"]
    lines = [f"rows generated      {g['rows']}/{g['problems']} (failures {g['failures_open']})",
             f"teacher spend       {g['teacher_calls']} calls, {g['prompt_tokens'] + g['completion_tokens']} tokens, "
             f"${g['cost_usd']:.4f}, 429s {g['n_429']}"]
    for algo, r in report["training"].items():
        e = r["end"]
        lines.append(f"train {algo:<13} loss {_fmt(e.get('loss_first'))} -> {_fmt(e.get('loss_last'))}, "
                     f"val loss {_fmt(e.get('val_loss'))}, val BLEU {_fmt(e.get('val_bleu'), 2)}")
    lines.append("")
    lines.append(f"{'decomposer':<12} {'paper':>6} {'strict':>6} {'flex':>6}  {'decomp tok':>10} {'solve tok':>9} "
                 f"{'total $':>9}  #subq")
    for e in report["evaluation"]:
        u = e["usage"]
        lines.append(f"{e['decomposer']:<12} {e['accuracy']['paper']:>6.3f} {e['accuracy']['strict']:>6.3f} "
                     f"{e['accuracy']['flexible']:>6.3f}  {u['decompose']['tokens']:>10} {u['solve']['tokens']:>9} "
                     f"{u['total']['cost_usd']:>9.5f}  {e['mean_subq']:.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- driver


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = _say) -> dict:
    """Run (or resume) the demo; returns the report dict (also OUT/report.json)."""
    import ray

    out = Path(cfg.out).resolve()
    if not cfg.offline and not os.environ.get(cfg.api_key_env):
        raise ConfigError(f"environment variable {cfg.api_key_env} is not set (a real --base-url needs its key)",
                          field="api_key_env")
    train_p, held = split_problems(cfg)  # input errors surface before anything is written
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    (out / "heldout.jsonl").write_text("".join(json.dumps({"question": p.problem, "answer": p.gold_answer}) + "\n"
                                               for p in held))
    times = StageTimes(out / "stages.json")
    stage = "start"  # the stage in progress, named when Ctrl-C stops it
    teacher = None
    started_ray = False
    started_serve = False

    def on_term(signum, frame):  # SIGTERM (e.g. `ray job stop`) behaves like Ctrl-C
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term)
    t_all = time.time()
    try:
        stage = "ray"
        t0 = time.time()
        if cfg.offline:  # before Ray starts: Serve replicas and actors inherit the environment of the local Ray
            os.environ[LOCAL_KEY_ENV] = LOCAL_KEY
        where = "joined the running Ray"
        if not ray.is_initialized():
            from cluster.connect import init_ray

            # local-only options are dropped by init_ray when it joins a cluster
            target = init_ray(cfg.ray_address, log_to_driver=False, num_cpus=max(2, os.cpu_count() or 2),
                              include_dashboard=False)
            where = f"joined {target.address}" if target.joining else "local"
            started_ray = not target.joining
        res = ray.cluster_resources()
        say(f"[1/8] ray       {where}: {res.get('CPU', 0):.0f} CPU, "
            f"{res.get('GPU', 0):.0f} GPU ({time.time() - t0:.0f}s)")
        times.record("ray", time.time() - t0)

        stage = "teacher"
        t0 = time.time()
        teacher_url = cfg.base_url
        if cfg.offline:
            from pipelines.teacher_server import TeacherServer, free_port

            # the same endpoint on every run of this OUT: replies are cached and the run manifest recorded per
            # endpoint, so a re-run on another port would pay again (and is refused as drift)
            port_file = out / "teacher_port"
            port = int(port_file.read_text()) if port_file.is_file() else free_port()
            port_file.write_text(str(port))
            teacher = TeacherServer(rpm=cfg.rpm, tpm=cfg.tpm, latency_s=cfg.teacher_latency_s,
                                    latency_jitter_s=cfg.teacher_latency_s / 3, port=port).start()
            teacher_url = teacher.base_url
            say(f"[2/8] teacher   local replay server at {teacher_url} (rpm {cfg.rpm}, latency "
                f"{cfg.teacher_latency_s * 1000:.0f} ms): released ChatGPT replies, synthetic where unrecorded")
        else:
            say(f"[2/8] teacher   {cfg.base_url} model {cfg.teacher_model} (key from ${cfg.api_key_env})")
        times.record("teacher", time.time() - t0)

        stage = "generate"
        t0 = time.time()
        say(f"[3/8] generate  {len(train_p)} problems x {cfg.n_sets} sets x (QG + QA + {cfg.n_feedback} feedback) "
            f"through teacher actors {cfg.actors} under rpm {cfg.rpm} -> {out / 'generate'}")
        gen = stage_generate(cfg, out, teacher_url)
        t = gen["this_run"]
        entry = times.record("generate", time.time() - t0, reused=gen["pending_at_start"] == 0)
        say(f"      {gen['rows_total']} rows ({t['rows']} new, {gen['problems'] - gen['pending_at_start']} re-used), "
            f"{t['requests_sent']} requests sent, {t['cache_hits']} cache hits, 429s {t['n_429']}, "
            f"${t['cost_usd']:.4f} ({StageTimes.describe(entry)})")

        stage = "model"
        t0 = time.time()
        existed = bool(cfg.model) or (out / "model" / "config.json").is_file()
        model = stage_model(cfg, out)
        entry = times.record("model", time.time() - t0, reused=existed)
        say(f"[4/8] model     {model}" + ("" if cfg.model else " (tiny random-init GPT-2, tokenizer trained locally)")
            + (f", {StageTimes.describe(entry)}" if entry["reused"] else ""))

        stage = "train"
        t0 = time.time()
        from subq.schema import read_parquet

        rows = read_parquet(str(out / "generate" / "parts"))
        dh = _data_hash(rows)
        say(f"[5/8] train     {', '.join(cfg.algos)} on {len(rows)} rows (data {dh}) -> {out / 'runs'}")
        runs = stage_train(cfg, out, model, str(out / "generate" / "parts"), dh, say, times)

        stage = "serve+evaluate"
        t0 = time.time()
        ev = reusable_evaluation(cfg, out, runs, held)
        if ev is not None:
            entry = times.record("serve+evaluate", 0.0, reused=True)
            say("[6/8] serve     not needed: the evaluation below finished earlier with the same problems and models")
            say(f"[7/8] evaluate  {StageTimes.describe(entry)} ({out / 'eval' / 'results.json'})")
        else:
            say(f"[6/8] serve     Ray Serve on 127.0.0.1: Decomposer -> Solver ({cfg.solver}) behind the FastAPI ingress")
            say(f"[7/8] evaluate  {len(held)} held-out problems through POST /v1/evaluations: none, teacher, "
                f"{', '.join(runs)}, all at once")
            started_serve = True
            ev = stage_serve_and_evaluate(cfg, out, runs, held, cfg.solver_base_url or teacher_url, say)
            times.record("serve+evaluate", time.time() - t0)

        stage = "report"
        report = write_demo_report(cfg, out, gen, runs, ev, times, time.time() - t_all)
        say(f"[8/8] report    {out / 'report.md'}")
        say("")
        say(summary_table(report))
        return report
    except KeyboardInterrupt:
        raise Stopped(f"stopped during {stage}; finished work is kept in {out}: re-run the same command "
                      f"to resume") from None
    finally:
        signal.signal(signal.SIGTERM, old_term)
        try:
            if started_serve and ray.is_initialized():
                from ray import serve

                try:
                    serve.shutdown()
                except Exception:  # noqa: BLE001 - Serve may never have started
                    pass
        finally:
            if teacher is not None:
                teacher.stop()
            if started_ray:
                ray.shutdown()
