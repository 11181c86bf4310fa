"""`subq demo`, the README's main command, end to end on a minimal budget (few problems, few steps): it is killed
(SIGKILL, with the local Ray and teacher server it started) while generating, then re-run with the same command; the
re-run does not regenerate finished rows, trains BC then Filtered BC, serves them, evaluates through the endpoint
and writes the report."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import psutil
import pytest

from subq.problems import load_problems
from subq.schema import read_parquet

pytestmark = pytest.mark.slow

# What Ray, Serve, DeepSpeed and their C++ cores print (log records, worker-prefixed lines, C++ sources): at the
# default verbosity none of it reaches the terminal; it is in the run's log file.
RAY_INTERNALS = re.compile(r"(\(\w+ pid=\d+|\(pid=\d+|\.cc:\d+|\b(INFO|WARNING|ERROR|DEBUG)\b.*\.py:\d+|"
                           r"PlacementGroupCleaner|core_worker|raylet|Nothing to shut down|\[RayletClient|"
                           r"Started a local Ray instance|deepspeed|DeepSpeed info|ninja|\x1b\[)")

N, M = 12, 4


def _rows(out):
    parts = out / "generate" / "parts"
    return read_parquet(str(parts)) if parts.exists() and any(parts.glob("*.parquet")) else []


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the demo's process group (driver, teacher server, the local Ray it started) and wait until gone."""
    members = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == proc.pid]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    psutil.wait_procs([p for p in members if p.is_running()], timeout=30)


def _pgid(pid: int):
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


@pytest.mark.timeout(1800)  # three demo runs (BC, FBC, ILQL each) on 2 cores
def test_demo_killed_while_generating_resumes_without_regenerating_and_reports(tmp_path, subq_bin):
    out = tmp_path / "demo"
    args = [subq_bin, "demo", "--out", str(out), "--problems", str(N), "--eval-problems", str(M), "--n-sets", "1",
            "--n-feedback", "1", "--rpm", "60", "--steps", "4", "--batch-size", "4", "--max-new-tokens", "16",
            "--num-workers", "1"]  # one Ray Train worker: distribution has its own tests (training/)
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "RAY_ADDRESS", "SUBQ_VERBOSE")}
    env["SUBQ_LOG_DIR"] = str(tmp_path / "logs")  # offline, keyless, default verbosity

    # 1) start, and kill everything once some rows are written (36 calls at 60 rpm: ~30 s of generation)
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not _rows(out):
        time.sleep(0.5)
    assert proc.poll() is None, "the demo ended before it could be killed: " + (proc.stdout.read() or "")[-3000:]
    assert _rows(out), "no rows written within 300 s"
    _kill_group(proc)
    before = {r.problem_id for r in _rows(out)}
    assert 0 < len(before) < N
    assert not (out / "report.md").exists()

    # 2) the same command again: resumes and completes
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for i in range(1, 9):
        assert f"[{i}/8]" in r.stdout, r.stdout

    gen = json.loads((out / "generate" / "summary.json").read_text())
    assert gen["pending_at_start"] == N - len(before)  # finished rows were not regenerated
    assert gen["this_run"]["rows"] == N - len(before) and gen["rows_total"] == N
    ids = [row.problem_id for row in _rows(out)]
    train_ids = [p.problem_id for p in load_problems("gsm8k:test", N)]
    assert sorted(ids) == sorted(train_ids)  # every problem exactly once
    assert before <= set(ids)

    report = json.loads((out / "report.json").read_text())
    assert report["offline"] is True
    assert report["generation"]["rows"] == N and report["generation"]["teacher_calls"] >= N * 3
    assert list(report["training"]) == ["bc", "filtered_bc", "ilql-dense"]  # offline RL by default, labelled
    for label in ("filtered_bc", "ilql-dense"):
        assert report["training"][label]["init_from"] == report["training"]["bc"]["final_dir"]
    for algo, t in report["training"].items():
        assert t["end"]["step"] == t["steps"] and t["end"]["loss_last"] is not None, (algo, t)
    evals = {e["decomposer"]: e for e in report["evaluation"]}
    assert list(evals) == ["none", "teacher", "bc", "filtered_bc", "ilql-dense"]
    assert all(e["n"] == M and e["errors"] == 0 for e in evals.values())
    # the decomposers are served together: every distilled evaluation started before the first of them ended
    ran = [evals[k]["ran"] for k in ("bc", "filtered_bc", "ilql-dense")]
    assert max(c for c, _ in ran) < min(f for _, f in ran), ran
    assert evals["none"]["usage"]["decompose"]["calls"] == 0
    assert evals["teacher"]["usage"]["decompose"]["cost_usd"] > 0
    assert evals["bc"]["usage"]["decompose"]["completion_tokens"] > 0
    assert evals["bc"]["usage"]["decompose"]["cost_usd"] == 0  # the local decomposer costs nothing
    # held-out problems were neither generated nor trained on
    res = json.loads((out / "eval" / "results.json").read_text())
    assert not {it["problem_id"] for run in res["runs"] for it in run["items"]} & set(train_ids)
    # a 4-step student may write no sub-question: the solver then answered single-stage. Never silent: each run
    # counts exactly its items without sub-questions, and eval/report.md states the count (two-stage itself is
    # proven in tests/pipelines/evaluate/test_two_stage.py with a student that writes well-formed sub-questions)
    eval_md = (out / "eval" / "report.md").read_text()
    for run in res["runs"]:
        if run["decomposer"] in ("bc", "filtered_bc", "ilql-dense"):
            k = sum(1 for it in run["items"] if not it["sub_questions"])
            assert run["summary"]["fell_back_single_stage"] == k == sum(it["fell_back"] for it in run["items"])
            assert f"| {run['decomposer']} | {M} of {M} |" in eval_md and f"| {k} of {M} |" in eval_md
            if k:
                assert f"`{run['decomposer']}` fell back to single-stage: {k} of {M} problems" in eval_md
    # the report's accuracy is what `subq score` computes from the evaluation's own outputs
    teacher_run = next(run for run in res["runs"] if run["decomposer"] == "teacher")
    s = subprocess.run([subq_bin, "score", str(out / "eval" / teacher_run["paper_raw"]), "--mode", "paper"],
                       capture_output=True, text=True, check=True)
    assert json.loads(s.stdout)["correct"] == evals["teacher"]["correct_paper"]

    import matplotlib.image as mpimg

    md = (out / "report.md").read_text()
    assert "Offline run" in md and "not a measurement" in md and "| filtered_bc |" in md and "acc paper" in md
    for png in ("eval/accuracy_vs_cost.png", "eval/subquestions_hist.png",
                f"runs/{report['training']['bc']['name']}/metrics.png"):
        img = mpimg.imread(str(out / png))  # decodes (a truncated or empty file fails here)
        assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 300 and img.std() > 0, (png, img.shape)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(report["training"]["filtered_bc"]["final_dir"])
    assert "decomposer" in r.stdout and str(out / "report.md") in r.stdout
    # quiet by default: our stage lines and progress only; Ray's own output went to the run's log file
    noise = [ln for ln in (r.stdout + r.stderr).splitlines() if RAY_INTERNALS.search(ln)]
    assert noise == [], noise[:20]
    assert "logs: " in r.stderr and any((tmp_path / "logs").glob("demo-*.log"))

    # 3) a third run re-uses everything: no generation, no training, no new evaluation
    r3 = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert r3.returncode == 0, r3.stdout[-3000:] + r3.stderr[-3000:]
    assert json.loads((out / "generate" / "summary.json").read_text())["pending_at_start"] == 0
    # honest re-runs: re-used stages say so and keep the timings of the run that did the work
    report3 = json.loads((out / "report.json").read_text())
    for stage in ("generate", "model", "train bc", "train filtered_bc", "train ilql-dense", "serve+evaluate"):
        assert report3["stages"][stage]["reused"] is True, (stage, report3["stages"])
    for stage in ("train bc", "train filtered_bc", "serve+evaluate"):
        assert report3["stages"][stage]["took_s"] == report["stages"][stage]["took_s"] > 0, stage
    assert "re-used (from " in r3.stdout and "[6/8] serve     not needed" in r3.stdout
    md3 = (out / "report.md").read_text()
    assert f"| train bc | re-used (from {report['stages']['train bc']['ran_at']}" in md3
    noise = [ln for ln in (r3.stdout + r3.stderr).splitlines() if RAY_INTERNALS.search(ln)]
    assert noise == [], noise[:20]
