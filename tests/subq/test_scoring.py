import json
import subprocess

import pytest

from subq.scoring import answer_correctness, gold_number, score, summarize, usefulness
from tests.conftest import CHAT_TEST, DATASET_TEST, RAW_TEST


def test_paper_mode_recomputes_released_answer_correctness_row_by_row():
    raw = [json.loads(line) for line in RAW_TEST.read_text().splitlines()]
    released = json.loads(DATASET_TEST.read_text())
    assert len(raw) == len(released) == 1319
    mismatches = [
        i for i, (r, d) in enumerate(zip(raw, released))
        if answer_correctness(r["answers"][0], r["answer"]) != d["rewards"]["answer_correctness"]
        or gold_number(r["answer"], "paper") != d["true_answer"]
    ]
    assert mismatches == []


def test_paper_gold_keeps_release_comma_quirk_but_strict_does_not():
    # The release scored gold "#### 2,125" as 2 (true_answer 2.0): paper mode reproduces it.
    assert gold_number("#### 2,125", "paper") == 2.0
    assert gold_number("#### 2,125", "strict") == 2125.0
    reply = "A1: ...\n\nFinal answer: 2125"
    assert not score(reply, "#### 2,125", "paper").correct
    assert score(reply, "#### 2,125", "strict").correct
    assert score(reply, "#### 2,125", "flexible").correct


@pytest.mark.parametrize(
    "reply,paper,strict,flexible",
    [
        ("A1: 3+4=7\n\nFinal answer: 7", True, True, True),
        ("A1: 3+4=7\n\nfinal answer: $7.", True, True, True),
        ("A1: so 7 eggs", False, False, True),  # no marker, nothing after char 12: a paper/strict miss
        ("#### 7", False, True, True),
        ("The answer is: 7", True, True, True),  # paper: no marker -> the release reads reply[12:] = "s: 7"
        ("Final answer: 7 eggs, then 8", True, True, False),
        ("Final answer: 8", False, False, False),
    ],
)
def test_modes(reply, paper, strict, flexible):
    assert score(reply, "#### 7", "paper").correct is paper
    assert score(reply, "#### 7", "strict").correct is strict
    assert score(reply, "#### 7", "flexible").correct is flexible


def test_paper_rule_without_marker_reads_after_the_12th_character():
    # the release: idx = reply.lower().find("final answer:") == -1, then the first number of reply[12:]
    s = score("The total is: 7 eggs", "#### 7", "paper")
    assert s.missing_final_answer and s.predicted == 7.0 and s.correct  # "The total is" is 12 characters
    s = score("We have 5 and 7", "#### 5", "paper")
    assert s.missing_final_answer and s.predicted == 7.0 and not s.correct  # "We have 5 an" hides the 5
    assert not score("The total is: 7 eggs", "#### 7", "strict").correct  # strict: no marker, a miss


def test_strict_takes_the_first_marker_like_lm_eval():
    reply = "A1: 2+3=5\nFinal answer: 5\n\nProblem: another one\nFinal answer: 9"
    assert score(reply, "#### 5", "strict").correct and score(reply, "#### 5", "strict").predicted == 5.0
    assert not score(reply, "#### 9", "strict").correct
    assert score(reply, "#### 5", "paper").correct  # the release also reads the first marker
    assert score(reply, "#### 9", "flexible").correct  # flexible: the last number


def test_two_thousand_125_gold_per_mode():
    reply = "A1: 2,000+125=2,125\nFinal answer: 2,125"
    assert score(reply, "#### 2,125", "paper").predicted == 2.0 and score(reply, "#### 2,125", "paper").correct
    assert score(reply, "#### 2,125", "strict").predicted == 2125.0 and score(reply, "#### 2,125", "strict").correct
    assert score(reply, "#### 2,125", "flexible").correct


@pytest.mark.parametrize("mode", ["paper", "strict", "flexible"])
def test_every_mode_counts_replies_without_a_marker(mode):
    s = summarize([score("nothing here 5", "#### 5", mode), score("Final answer: 5", "#### 5", mode)])
    assert s["missing_final_answer"] == 1


def test_missing_final_answer_is_counted():
    s = summarize([score("no marker 5", "#### 5"), score("Final answer: 5", "#### 5")])
    assert s == {"n": 2, "correct": 1, "accuracy": 0.5, "missing_final_answer": 1}


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown scoring mode"):
        score("Final answer: 1", "#### 1", "fuzzy")


def test_usefulness_is_fraction_of_yes_per_line():
    fb = ["Q1: Yes\nQ2: No\nQ3: Yes", "Q1: Yes\nQ2: Yes\nQ3: No", "Q1: No\nQ2: No"]
    assert usefulness(fb, 3) == [2 / 3, 1 / 3, 1 / 3]
    assert usefulness([], 3) == []


def run_score(subq_bin, *args):
    out = subprocess.run([subq_bin, "score", *map(str, args)], capture_output=True, text=True, timeout=120)
    return out


def test_cli_score_raw_and_chat(subq_bin):
    out = run_score(subq_bin, RAW_TEST, "--mode", "paper")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    released = json.loads(DATASET_TEST.read_text())
    expected = sum(d["rewards"]["answer_correctness"] for d in released) / len(released)
    assert result["n"] == 1319
    assert result["accuracy"] == pytest.approx(expected)
    assert result["missing_final_answer"] == 2  # rows 916 and 1201 have no "Final answer:"
    for mode in ("paper", "strict", "flexible"):
        out = run_score(subq_bin, CHAT_TEST, "--mode", mode)
        assert out.returncode == 0, out.stderr
        chat = json.loads(out.stdout)
        assert chat["n"] == 1319 and 0.5 < chat["accuracy"] < 0.8, chat


def test_cli_score_answers_as_string(tmp_path, subq_bin):
    f = tmp_path / "one.jsonl"
    f.write_text(json.dumps({"problem": "p?", "questions": "Q1: a?", "answers": "A1: 2\n\nFinal answer: 2", "answer": "#### 2"}) + "\n")
    out = run_score(subq_bin, f)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["accuracy"] == 1.0


def test_cli_score_bad_input(tmp_path, subq_bin):
    out = run_score(subq_bin, tmp_path / "missing.jsonl")
    assert out.returncode == 2 and "file not found" in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "p", "questions": ["Q1: a"], "answer": "#### 1"}) + "\n")
    out = run_score(subq_bin, bad)
    assert out.returncode == 2 and "'answers'" in out.stderr
    out = run_score(subq_bin, RAW_TEST, "--mode", "fuzzy")
    assert out.returncode == 2 and "--mode" in out.stderr
