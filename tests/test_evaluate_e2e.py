"""`subq eval` end to end: the real command (Ray Data over the split) with the teacher server as solver and a tiny
local decomposer; the report directory is complete, its PNGs open, and `subq score` on each pair's paper_raw file
gives the accuracy results.json reports."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

pytestmark = pytest.mark.slow


def test_subq_eval_writes_report_directory(tmp_path, subq_bin):
    import matplotlib.image as mpimg

    from pipelines.teacher_server import TeacherServer

    from training.init_model import create_tiny_model

    model_dir = tmp_path / "tiny"
    create_tiny_model(str(model_dir), n_layer=2, n_embd=64)
    decomposers = ["--decomposer", "none", "--decomposer", "teacher", "--decomposer", f"tiny={model_dir}"]
    out = tmp_path / "report"
    with TeacherServer() as teacher:
        r = subprocess.run(
            [subq_bin, "eval", "--data", "gsm8k-ai-subq:test", "--limit", "6", *decomposers, "--max-new-tokens", "16",
             "--solver-base-url", teacher.base_url, "--solver-model", "gpt-3.5-turbo", "--batch-size", "3",
             "--api-key-env", "SUBQ_TEST_SOLVER_KEY", "--out", str(out)],
            capture_output=True, text=True, timeout=600, env={**os.environ, "SUBQ_TEST_SOLVER_KEY": "local-test-key"})
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert [x["decomposer"] for x in summary["runs"]] == ["none", "teacher", "tiny"]
    for name in ("results.json", "report.md", "accuracy_vs_cost.png", "subquestions_hist.png"):
        assert (out / name).is_file(), name
    for png in ("accuracy_vs_cost.png", "subquestions_hist.png"):
        img = mpimg.imread(out / png)
        assert img.ndim == 3 and min(img.shape[:2]) > 100
    res = json.loads((out / "results.json").read_text())
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
    assert all(s["usage"]["solve"]["calls"] >= 6 and s["errors"] == 0 for s in by.values())
