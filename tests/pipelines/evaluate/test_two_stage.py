"""Two-stage for real: a student that reliably writes the released sub-questions (a tiny GPT-2 overfit on 2 short
problems of the released GSM8K-AI-SubQ test file, their set 0) is served and evaluated, and the solver (the local
teacher server, recording what it receives) gets exactly those sub-questions in the paper's answerer (QA) prompt;
the item is scored from the solver's reply. Through Ray Serve over HTTP (/v1/solve) and through `subq eval`.
A fallback to single-stage fails these tests (it is a counted outcome: `fell_back_single_stage`)."""

from __future__ import annotations

import json
import os
import subprocess

import httpx
import pytest

from tests.conftest import DATASET_TEST
from conftest import local_ray

pytestmark = pytest.mark.slow

N = 2
SOLVER = "gpt-3.5-turbo"
KEY_ENV = {"SUBQ_TEST_SOLVER_KEY": "local-test-key"}



@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """(checkpoint dir, [(problem, gold, released questions)], data file): the student reproduces the released sets
    of the N shortest of the first 100 released problems (short: the overfit stays cheap)."""
    from subq.schema import read_rows
    from subq.textformat import get_format
    from tests.training.test_text_contract import _overfit
    from training.data import Example, collate, encode
    from training.decomposer import generate_subquestions, load_decomposer
    from training.init_model import create_tiny_model

    base = tmp_path_factory.mktemp("student")
    path = create_tiny_model(str(base / "m"), n_layer=2, n_embd=64, max_texts=400)
    d = load_decomposer(path)
    fmt = get_format("paper")
    # the released questions as the parser returns them (some released ones end with a space)
    rows = [(r.problem, r.gold_answer, [q.strip() for q in r.sets[0].questions])
            for r in read_rows(str(DATASET_TEST))[:100] if r.sets and r.sets[0].questions]
    encs = sorted(((encode(Example(str(i), p, qs), d.tokenizer, fmt, 512), (p, g, qs)) for i, (p, g, qs) in enumerate(rows)),
                  key=lambda x: len(x[0]["input_ids"]))[:N]
    cases = [c for _, c in encs]
    _overfit(d.model, collate([e for e, _ in encs], d.tokenizer.pad_token_id), 600)
    d.model.save_pretrained(path)
    gens = generate_subquestions(load_decomposer(path), [c[0] for c in cases])
    assert [g.questions for g in gens] == [c[2] for c in cases] and all(g.eos for g in gens)
    data = base / "problems.jsonl"  # the same problems for `subq eval` (GSM8K's question/answer records)
    data.write_text("".join(json.dumps({"question": p, "answer": g}) + "\n" for p, g, _ in cases))
    return path, cases, str(data)


def _qa_messages(problem: str, questions: list[str]) -> list[dict]:
    from subq.prompts import messages, template_for

    return messages(template_for("paper", "qa"), problem, questions)


def _received_qa(teacher, problem: str) -> list[dict]:
    """The answered calls whose prompt is a QA prompt for `problem` (parsed by the server's own parser)."""
    from subq.prompts import parse_prompt

    out = []
    for rec in teacher.prompts():
        parsed = parse_prompt("\n".join(m["content"] for m in rec["messages"]))
        if parsed and parsed[0] == template_for_qa() and parsed[1].split() == problem.split():
            out.append(rec)
    return out


def template_for_qa() -> str:
    from subq.prompts import template_for

    return template_for("paper", "qa")


def test_serve_solve_sends_the_students_subquestions_to_the_solver(student, tmp_path):
    from pipelines.serve import ServeConfig, start_serve, stop_serve
    from pipelines.teacher_server import TeacherServer, free_port
    from subq.evaluation import paper_gold
    from subq.scoring import score

    path, cases, data = student
    os.environ.update(KEY_ENV)
    local_ray()
    try:
        with TeacherServer(record_prompts=True) as teacher:
            cfg = ServeConfig(port=free_port(), decomposer={"path": path}, api_keys_env=None,
                              solver={"name": SOLVER, "base_url": teacher.base_url, "api_key_env": "SUBQ_TEST_SOLVER_KEY",
                                      "max_retries": 1, "timeout_s": 30},
                              decomposer_num_cpus=0.5, results_root=str(tmp_path / "results"))
            base = start_serve(cfg, ray_init={})
            with httpx.Client(base_url=base, timeout=120) as c:
                for problem, gold, questions in cases:
                    r = c.post("/v1/solve", json={"problem": problem, "decomposer": "distilled", "gold_answer": gold})
                    assert r.status_code == 200, r.text
                    b = r.json()
                    assert b["mode"] == "two_stage" and b["fell_back_single_stage"] is False
                    assert b["sub_questions"] == questions
                    got = _received_qa(teacher, problem)
                    assert len(got) == 1, [g["messages"] for g in got]
                    assert got[0]["messages"] == _qa_messages(problem, questions)  # exactly the paper's QA prompt
                    assert b["answer_text"] == got[0]["reply"]  # the solver's reply ...
                    for mode, s in b["scores"].items():  # ... is what was scored
                        assert s == score(got[0]["reply"], paper_gold(gold), mode).to_dict()
                    assert b["usage"]["decompose"]["completion_tokens"] > 0
            assert teacher.stats(keys=False)["by_template"] == {template_for_qa(): N}  # no QG call: our student
    finally:
        stop_serve()


def test_subq_eval_two_stage_scores_the_solvers_reply(student, tmp_path, subq_bin):
    from pipelines.teacher_server import TeacherServer
    from subq.scoring import score

    path, cases, data = student
    out = tmp_path / "report"
    with TeacherServer(record_prompts=True) as teacher:
        cmd = [subq_bin, "eval", "--data", data, "--limit", str(N), "--decomposer", f"student={path}",
               "--solver-base-url", teacher.base_url, "--solver-model", SOLVER, "--api-key-env", "SUBQ_TEST_SOLVER_KEY",
               "--out", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **KEY_ENV})
        assert r.returncode == 0, r.stderr[-3000:]
        received = teacher.prompts()
    res = json.loads((out / "results.json").read_text())
    (run,) = res["runs"]
    assert run["summary"]["fell_back_single_stage"] == 0 and run["summary"]["errors"] == 0
    items = sorted(run["items"], key=lambda it: it["index"])
    assert len(items) == N
    assert len(received) == N  # one solver call per item, nothing else (no QG: the student decomposed)
    for it, (problem, gold, questions) in zip(items, cases):
        assert it["problem"] == problem and it["sub_questions"] == questions and not it["fell_back"]
        (rec,) = [x for x in received if x["messages"] == _qa_messages(problem, questions)]
        assert it["answer_text"] == rec["reply"]
        for mode, s in it["scores"].items():
            assert s == score(rec["reply"], it["gold_answer"], mode).to_dict()
    assert run["summary"]["accuracy"]["paper"]["correct"] == sum(it["scores"]["paper"]["correct"] for it in items)
