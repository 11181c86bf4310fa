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
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

from subq.errors import ConfigError, SubqError
from pipelines.demo.config import LOCAL_KEY, LOCAL_KEY_ENV, DemoConfig
from pipelines.demo.report import StageTimes, summary_table, write_demo_report



class Stopped(Exception):
    """Ctrl-C / SIGTERM during a stage."""


def _say(msg: str) -> None:
    from subq import console

    print(msg, file=console.out(), flush=True)


def _data_hash(rows) -> str:
    return hashlib.sha256("\n".join(sorted(r.problem_id for r in rows)).encode()).hexdigest()[:8]


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
    session = contextlib.ExitStack()  # Ray for the demo (cluster.connect.ray_session), left at the very end
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
        from cluster.connect import ray_session

        connected = ray.is_initialized()
        # local-only options are dropped when it joins a cluster
        target = session.enter_context(ray_session(cfg.ray_address, log_to_driver=False, include_dashboard=False,
                                                   num_cpus=max(2, os.cpu_count() or 2)))
        where = "joined the running Ray" if connected else f"joined {target.address}" if target.joining else "local"
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
            session.close()
