"""Evaluation bookkeeping (no Ray): scoring every mode, per-stage usage, paper_raw round trip through
`subq score`, and the report directory (results.json, report.md, PNGs that open)."""

from __future__ import annotations

import json
import subprocess

import pytest

from pipelines.evaluate import parse_decomposer_spec
from subq.evaluation import (
    Answer, Decomposition, StageUsage, fail_item, final_answer_of, finish_item, new_item, paper_gold, summarize_items, write_paper_raw,
)
from subq.report import markdown_table, write_report
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
               f"I think it is {golds[2]}",  # flexible, and paper by the release's quirk (reply[12:] = "s N")
               "Final answer: -1",  # wrong everywhere
               None,  # solver failed
               f"Final answer: {golds[5]}"]
    items = _items(problems, replies)
    s = summarize_items(items)
    assert s["n"] == 6 and s["errors"] == 1 and s["errors_by_stage"]["solve"] == 1
    assert s["accuracy"]["paper"]["correct"] == 3
    assert s["accuracy"]["strict"]["correct"] == 3
    assert s["accuracy"]["flexible"]["correct"] == 4
    # the failed item is an error, not a miss: accuracy is over the 5 scored items
    assert s["scored"] == 5 and all(s["accuracy"][m]["n"] == 5 for m in s["accuracy"])
    assert s["accuracy"]["flexible"]["accuracy"] == pytest.approx(4 / 5)
    lo, hi = s["accuracy"]["flexible"]["ci95"]
    assert lo == pytest.approx(0.3755, abs=1e-3) and hi == pytest.approx(0.9638, abs=1e-3)  # Wilson 4/5
    assert s["error_reasons"][0][1] == 1 and "solver upstream" in s["error_reasons"][0][0]
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
    assert [r.problem for r in rows] == [p.problem for i, p in enumerate(problems) if i != 3]  # the failed one is out
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
    assert r.returncode == 2 and "solver.model" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([subq_bin, "eval", "--out", str(tmp_path / "o"), "--decomposer", f"x={tmp_path}/nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "decomposers" in r.stderr
    assert not (tmp_path / "o").exists()


def _run(name, items):
    return {"decomposer": name, "solver": "gpt-3.5-turbo", "summary": summarize_items(items), "items": items}


def test_report_trust_fields_samples_paired_and_caveat(problems, tmp_path):
    from subq.evaluation import Decomposition
    from subq.report import OFFLINE_CAVEAT, paired_vs_none

    golds = [paper_gold(p.gold_answer).split()[-1] for p in problems]
    none_items = _items(problems, [f"Final answer: {g}" if i < 3 else "Final answer: 0" for i, g in enumerate(golds)])
    dec_items = []
    for i, p in enumerate(problems):  # a distilled decomposer: no sub-question for the first 2 problems
        it = new_item(i, p, "bc", "gpt-3.5-turbo")
        qs = [] if i < 2 else ["What is x?"]
        d = Decomposition(qs, "", StageUsage("bc", 10, 5 if qs else 1, 0.0, 0.01, 1))
        a = Answer(f"Final answer: {golds[i] if i >= 1 else 0}", StageUsage("gpt-3.5-turbo", 200, 50, 0.0003, 0.2, 1,
                                                                     provenance="replay"))
        dec_items.append(finish_item(it, d, a))
    runs = [_run("none", none_items), _run("bc", dec_items)]
    s = runs[1]["summary"]
    assert s["fell_back_single_stage"] == 2 and runs[0]["summary"]["fell_back_single_stage"] == 0
    assert s["offline"] and s["provenance"] == {"replay": 6} and not runs[0]["summary"]["offline"]
    assert s["few_shot_items"] == 3 and s["accuracy_without_few_shot"]["paper"]["n"] == 3  # gsm8k:test 0-2
    paired = paired_vs_none(runs)[0]
    assert paired["only_none_correct"] == 1 and paired["only_this_correct"] == 3 and paired["n_paired"] == 6
    assert paired["delta"] == pytest.approx(2 / 6) and 0 < paired["mcnemar_p"] <= 1
    write_report(str(tmp_path / "rep"), runs, {"data": "gsm8k:test", "limit": 6})
    res = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert {"subq", "ray", "torch", "transformers"} <= set(res["versions"]) and res["versions"]["ray"]
    assert res["date"] and res["config"]["limit"] == 6 and "git_hash" in res and res["offline"] is True
    assert res["results"]["bc"]["acc_paper,none"] == s["accuracy"]["paper"]["accuracy"]
    lines = [json.loads(x) for x in (tmp_path / "rep" / "samples_bc.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and [x["doc_id"] for x in lines] == list(range(6))
    for key in ("doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics", "doc_hash",
                "prompt_hash", "target_hash", "acc_paper", "few_shot", "fell_back_single_stage", "provenance"):
        assert key in lines[0], key
    assert [x["few_shot"] for x in lines] == [True, True, True, False, False, False]
    assert lines[0]["fell_back_single_stage"] and not lines[3]["fell_back_single_stage"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert OFFLINE_CAVEAT in md.split("\n\n")[1]  # the first paragraph
    assert "fell back to single-stage: 2 of 6" in md and "McNemar" in md and "[" in md


def test_plot_labels_never_overprint_and_carry_the_offline_caveat(problems):
    from subq.evaluation import Answer
    from subq.report import report_figures

    runs = []
    for name in ("none", "teacher", "bc", "filtered_bc", "ilql"):  # identical accuracy and cost: coinciding points
        items = []
        for i, p in enumerate(problems):
            it = new_item(i, p, name, "gpt-3.5-turbo")
            items.append(finish_item(it, None, Answer("Final answer: 0", StageUsage("gpt-3.5-turbo", 200, 50, 0.0003, 0.2,
                                                                                     1, provenance="replay"))))
        runs.append(_run(name, items))
    figs = report_figures(runs)
    fig = figs["accuracy_vs_cost.png"]
    ax = fig.axes[0]
    r = fig.canvas.get_renderer()
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(t, r) for t in ax.texts]
    assert len(boxes) == 5
    assert not any(boxes[i].overlaps(boxes[j]) for i in range(5) for j in range(i + 1, 5))
    for f in figs.values():
        assert any("OFFLINE" in t.get_text() for t in f.texts)
    runs_online = [_run(r["decomposer"], [finish_item(new_item(i, p, r["decomposer"], "x"), None,
                                                      Answer("Final answer: 0", StageUsage("x")))
                                          for i, p in enumerate(problems)]) for r in runs[:2]]
    assert not any("OFFLINE" in t.get_text() for f in report_figures(runs_online).values() for t in f.texts)


def test_failure_verdict_all_some_none(problems):
    from pipelines.evaluate import failure_verdict

    good = _items(problems, [f"Final answer: {paper_gold(p.gold_answer).split()[-1]}" for p in problems])
    some = _items(problems, ["Final answer: 1", None, None, "Final answer: 2", None, "x"])
    bad = _items(problems, [None] * len(problems))
    assert failure_verdict([_run("none", good)], "out") == (None, None)
    fatal, warn = failure_verdict([_run("none", some)], "out")
    assert fatal is None and warn.startswith("warning: 3 of 6 items failed") and "out/results.json" in warn
    assert "most common: 3x solve: solver upstream" in warn
    fatal, warn = failure_verdict([_run("none", bad)], "out")
    assert warn is None and fatal.startswith("every item failed (6 of 6)") and "solver upstream" in fatal
