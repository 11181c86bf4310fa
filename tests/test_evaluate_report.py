"""Evaluation bookkeeping (no Ray): scoring every mode, per-stage usage, paper_raw round trip through
`subq score`, and the report directory (results.json, report.md, PNGs that open)."""

from __future__ import annotations

import json
import subprocess

import pytest

from pipelines.evaluate import (
    Answer, Decomposition, StageUsage, fail_item, final_answer_of, finish_item, markdown_table, new_item,
    paper_gold, parse_decomposer_spec, summarize_items, write_paper_raw, write_report,
)
from subq.errors import ConfigError
from subq.problems import load_problems
from subq.schema import read_rows


def _items(problems, replies):
    """Items as the pipeline builds them: a decomposition, a solver reply (or a failure), scored."""
    items = []
    for i, (p, reply) in enumerate(zip(problems, replies)):
        it = new_item(i, p, "teacher", "gpt-3.5-turbo")
        d = Decomposition([f"What is step {k}?" for k in range(1 + i % 3)], "", StageUsage("gpt-3.5-turbo", 100, 20, 0.00014, 0.1, 1))
        if reply is None:
            it.sub_questions, it.decomposition_text = d.questions, "Q1: What is step 0?"
            it.usage["decompose"] = d.usage.to_dict()
            items.append(fail_item(it, "solve", "solver upstream http://127.0.0.1:9/v1 failed"))
        else:
            items.append(finish_item(it, d, Answer(reply, StageUsage("gpt-3.5-turbo", 200, 50, 0.0003, 0.2, 1))))
    return items


@pytest.fixture(scope="module")
def problems():
    return load_problems("gsm8k:test", 6)


def test_paper_gold_uses_the_number_after_hashes(problems):
    # GSM8K's worked solution starts with other numbers: the paper rule must see "#### 18"
    assert paper_gold(problems[0].gold_answer) == "#### 18"
    assert paper_gold("#### 2,125") == "#### 2,125"
    assert final_answer_of("A1: x\n\nFinal answer: 18") == "18"
    assert final_answer_of("so... The answer is: $1,200.") == "1,200"
    assert final_answer_of("no marker") is None


def test_summary_scores_every_mode_and_counts_stages(problems):
    golds = [paper_gold(p.gold_answer).split()[-1] for p in problems]
    replies = [f"A1: ok\n\nFinal answer: {golds[0]}",  # right in every mode
               f"#### {golds[1]}",  # strict + flexible only
               f"I think it is {golds[2]}",  # flexible only
               "Final answer: -1",  # wrong everywhere
               None,  # solver failed
               f"Final answer: {golds[5]}"]
    items = _items(problems, replies)
    s = summarize_items(items)
    assert s["n"] == 6 and s["errors"] == 1 and s["errors_by_stage"]["solve"] == 1
    assert s["accuracy"]["paper"]["correct"] == 2
    assert s["accuracy"]["strict"]["correct"] == 3
    assert s["accuracy"]["flexible"]["correct"] == 4
    assert s["usage"]["decompose"]["prompt_tokens"] == 600 and s["usage"]["decompose"]["calls"] == 6
    assert s["usage"]["solve"]["completion_tokens"] == 250 and s["usage"]["solve"]["calls"] == 5
    assert s["usage"]["total"]["cost_usd"] == pytest.approx(6 * 0.00014 + 5 * 0.0003)
    assert s["sub_questions"]["histogram"] == {"1": 2, "2": 2, "3": 2}
    assert items[0].final_answer == golds[0]


@pytest.mark.parametrize("mode", ["paper", "strict", "flexible"])
def test_paper_raw_scores_the_same_with_subq_score(problems, tmp_path, subq_bin, mode):
    golds = [paper_gold(p.gold_answer).split()[-1] for p in problems]
    replies = [f"Final answer: {golds[0]}", f"#### {golds[1]}", "x 3", None, f"Final answer: {golds[4]}", "Final answer: 0"]
    items = _items(problems, replies)
    path = tmp_path / "out.paper_raw.jsonl"
    write_paper_raw(items, str(path))
    rows = read_rows(str(path))
    assert [r.problem for r in rows] == [p.problem for p in problems]
    out = subprocess.run([subq_bin, "score", str(path), "--mode", mode], capture_output=True, text=True, check=True)
    scored = json.loads(out.stdout)
    s = summarize_items(items)["accuracy"][mode]
    assert (scored["n"], scored["correct"]) == (s["n"], s["correct"])
    assert scored["accuracy"] == pytest.approx(s["accuracy"])


def test_report_directory_and_pngs_open(problems, tmp_path):
    import matplotlib.image as mpimg

    items_a = _items(problems, [f"Final answer: {paper_gold(p.gold_answer).split()[-1]}" for p in problems])
    items_b = _items(problems, ["Final answer: 0"] * len(problems))
    runs = [{"decomposer": "teacher", "solver": "gpt-3.5-turbo", "summary": summarize_items(items_a), "items": items_a},
            {"decomposer": "none", "solver": "gpt-3.5-turbo", "summary": summarize_items(items_b), "items": items_b}]
    written = write_report(str(tmp_path / "rep"), runs, {"data": "gsm8k:test"})
    for name in ("results.json", "report.md", "accuracy_vs_cost.png", "subquestions_hist.png",
                 "teacher__gpt-3.5-turbo.paper_raw.jsonl", "none__gpt-3.5-turbo.paper_raw.jsonl"):
        assert (tmp_path / "rep" / name).is_file(), name
    for png in ("accuracy_vs_cost.png", "subquestions_hist.png"):
        img = mpimg.imread(tmp_path / "rep" / png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    res = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert [r["decomposer"] for r in res["runs"]] == ["teacher", "none"]
    assert res["runs"][0]["summary"]["accuracy"]["paper"]["accuracy"] == 1.0
    assert len(res["runs"][0]["items"]) == len(problems)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| teacher | gpt-3.5-turbo | 6 | 1.000 |" in md and "| none | gpt-3.5-turbo | 6 | 0.000 |" in md
    assert markdown_table(runs).count("\n") == 4
    assert set(written) >= {"results.json", "report.md"}


def test_decomposer_specs(tmp_path):
    assert parse_decomposer_spec("none") == ("none", None)
    assert parse_decomposer_spec("teacher") == ("teacher", None)
    assert parse_decomposer_spec(f"bc={tmp_path}") == ("bc", str(tmp_path))
    assert parse_decomposer_spec(str(tmp_path))[1] == str(tmp_path)
    with pytest.raises(ConfigError, match="decomposers"):
        parse_decomposer_spec(f"bc={tmp_path}/missing")


def test_eval_bad_input_is_one_line_naming_the_field(subq_bin, tmp_path):
    r = subprocess.run([subq_bin, "eval", "--data", "gsm8k:test"], capture_output=True, text=True)
    assert r.returncode == 2 and "--out" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([subq_bin, "eval", "--out", str(tmp_path / "o"), "--solver-model", "nonesuch-model"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "solver.name" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([subq_bin, "eval", "--out", str(tmp_path / "o"), "--decomposer", f"x={tmp_path}/nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "decomposers" in r.stderr
    assert not (tmp_path / "o").exists()
