"""`subq eval` end to end: the real command (Ray Data over the split) with the teacher server as solver and a tiny
local decomposer; the report directory is complete, its PNGs open, and `subq score` on each pair's paper_raw file
gives the accuracy results.json reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("cli_ray")]  # one Ray head for the module's jobs

KEY_ENV = {"SUBQ_TEST_SOLVER_KEY": "local-test-key"}  # not in the shared head's environment: the key reaches the actors through the object store


def _eval_cmd(subq_bin, teacher, out, limit, decomposers, *extra):
    return [subq_bin, "eval", "--data", "gsm8k-ai-subq:test", "--limit", str(limit), *decomposers,
            "--solver-base-url", teacher.base_url, "--solver-model", "gpt-3.5-turbo",
            "--api-key-env", "SUBQ_TEST_SOLVER_KEY", "--out", str(out), *extra]


def test_subq_eval_writes_report_directory(tmp_path, subq_bin):
    import matplotlib.image as mpimg

    from pipelines.teacher_server import TeacherServer

    from training.init_model import create_tiny_model

    model_dir = tmp_path / "tiny"
    create_tiny_model(str(model_dir), n_layer=2, n_embd=64)
    decomposers = ["--decomposer", "none", "--decomposer", "teacher", "--decomposer", f"tiny={model_dir}"]
    out = tmp_path / "report"
    with TeacherServer() as teacher:
        cmd = _eval_cmd(subq_bin, teacher, out, 6, decomposers, "--max-new-tokens", "16", "--batch-size", "3")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **KEY_ENV})
        assert r.returncode == 0, r.stderr[-3000:]
        first = teacher.stats(keys=False)
        res = json.loads((out / "results.json").read_text())
        # the same command again: every solver call is in the durable cache, the server sees no request
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **KEY_ENV})
        assert again.returncode == 0, again.stderr[-3000:]
        assert teacher.stats(keys=False)["total"] == first["total"] > 0
    assert "OFFLINE" in r.stderr and json.loads(r.stdout.strip().splitlines()[-1])["offline"] is True
    res2 = json.loads((out / "results.json").read_text())
    assert all(run["summary"]["usage"]["solve"]["calls"] == 0 for run in res2["runs"])  # nothing paid the 2nd time
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert [x["decomposer"] for x in summary["runs"]] == ["none", "teacher", "tiny"]
    for name in ("results.json", "report.md", "accuracy_vs_cost.png", "subquestions_hist.png"):
        assert (out / name).is_file(), name
    for png in ("accuracy_vs_cost.png", "subquestions_hist.png"):
        img = mpimg.imread(out / png)
        assert img.ndim == 3 and min(img.shape[:2]) > 100
    md = (out / "report.md").read_text()
    for run in res["runs"]:
        assert len(run["items"]) == 6 and run["summary"]["n"] == 6
        assert f"| {run['decomposer']} | gpt-3.5-turbo | 6 |" in md
        for mode in ("paper", "strict", "flexible"):
            s = subprocess.run([subq_bin, "score", str(out / run["paper_raw"]), "--mode", mode],
                               capture_output=True, text=True, check=True)
            scored = json.loads(s.stdout)
            assert scored["correct"] == run["summary"]["accuracy"][mode]["correct"], (run["decomposer"], mode)
    by = {run["decomposer"]: run["summary"] for run in res["runs"]}
    assert by["none"]["usage"]["decompose"]["calls"] == 0 and by["none"]["sub_questions"]["mean"] == 0
    assert by["teacher"]["usage"]["decompose"]["cost_usd"] > 0 and by["teacher"]["sub_questions"]["mean"] > 1
    assert by["teacher"]["accuracy"]["paper"]["correct"] > 0
    assert by["tiny"]["usage"]["decompose"]["completion_tokens"] > 0 and by["tiny"]["usage"]["decompose"]["cost_usd"] == 0
    assert all(s["errors"] == 0 for s in by.values()), {k: s["error_reasons"] for k, s in by.items()}
    # a decomposer that wrote no sub-question sends `none`'s exact QA prompt: the durable cache answers it, unpaid
    assert by["none"]["usage"]["solve"]["calls"] >= 6 and by["teacher"]["usage"]["solve"]["calls"] >= 6
    assert by["tiny"]["usage"]["solve"]["calls"] >= 6 - by["tiny"]["fell_back_single_stage"]
    # the random tiny model's fallbacks are counted exactly and reported, never taken for two-stage (the two-stage
    # path itself: tests/pipelines/evaluate/test_two_stage.py)
    tiny_items = next(run for run in res["runs"] if run["decomposer"] == "tiny")["items"]
    k = sum(1 for it in tiny_items if not it["sub_questions"])
    assert by["tiny"]["fell_back_single_stage"] == k == sum(it["fell_back"] for it in tiny_items)
    assert "| tiny | 6 of 6 |" in md and f"| {k} of 6 |" in md
    if k:
        assert f"`tiny` fell back to single-stage: {k} of 6 problems" in md
    assert {"subq", "ray", "torch", "transformers"} <= set(res["versions"]) and res["date"] and res["config"]["limit"] == 6
    for name in ("none", "teacher", "tiny"):
        lines = (out / f"samples_{name}.jsonl").read_text().splitlines()
        assert len(lines) == 6 and json.loads(lines[0])["doc_id"] == 0 and "filtered_resps" in json.loads(lines[0])
    assert "fell back to single-stage" in md and "Wilson" in md and "McNemar" in md
    assert md.index("OFFLINE") < md.index("| decomposer |")


def test_subq_eval_killed_midway_resumes_paying_only_unfinished_calls(tmp_path, subq_bin):
    from pipelines.teacher_server import TeacherServer

    out = tmp_path / "report"
    with TeacherServer(latency_s=0.5) as teacher:
        cmd = _eval_cmd(subq_bin, teacher, out, 16, ["--decomposer", "none"], "--batch-size", "4", "--concurrency", "2")
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **KEY_ENV},
                             start_new_session=True)
        try:
            deadline = time.time() + 300
            while teacher.stats(keys=False).get("completed", 0) < 5 and time.time() < deadline and p.poll() is None:
                time.sleep(0.3)
            assert p.poll() is None, "the run ended before it could be killed mid-way"
        finally:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        # joined to a cluster, the killed job's actors live until Ray sees their driver gone and may still send and
        # cache a call or two: count once the server has been quiet for 3 s
        sent_before, quiet_since = teacher.stats(keys=False)["total"], time.time()
        while time.time() - quiet_since < 3 and time.time() < deadline + 60:
            time.sleep(0.5)
            now = teacher.stats(keys=False)["total"]
            if now != sent_before:
                sent_before, quiet_since = now, time.time()
        cached = len(list((out / "cache").rglob("*.json")))
        assert 0 < cached < 16 and not (out / "results.json").exists()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **KEY_ENV})
        assert r.returncode == 0, r.stderr[-3000:]
        assert teacher.stats(keys=False)["total"] - sent_before == 16 - cached  # only the unfinished items
    res = json.loads((out / "results.json").read_text())
    assert res["runs"][0]["summary"]["n"] == 16 and res["runs"][0]["summary"]["errors"] == 0


def test_subq_eval_where_every_call_fails_exits_nonzero_with_the_cause(tmp_path, subq_bin):
    from pipelines.teacher_server import TeacherServer

    with TeacherServer(api_key="the-right-key") as teacher:  # /models answers; every chat call is a 401
        r = subprocess.run(_eval_cmd(subq_bin, teacher, tmp_path / "r", 3, ["--decomposer", "none"]),
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, "SUBQ_TEST_SOLVER_KEY": "a-wrong-key"})
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1, r.stderr[-3000:]
    assert "every item failed" in errors[0] and "401" in errors[0] and "results.json" in errors[0]
    assert "a-wrong-key" not in r.stderr + r.stdout
