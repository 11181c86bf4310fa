"""Parsers on real released replies, including the malformed ones found in the data."""

import json

import pytest

from subq.parsers import format_subquestions, parse_answers, parse_doc_subquestions, parse_feedback, parse_subquestions
from tests.conftest import RAW_TEST

RAW = [json.loads(line) for line in RAW_TEST.read_text().splitlines()]


def test_every_released_qg_reply_parses():
    results = [parse_subquestions(r["questions"][0]) for r in RAW]
    assert all(r.ok for r in results), [r.reason for r in results if not r.ok][:3]
    assert results[0].questions[0] == "How many eggs does Janet eat for breakfast every morning?"
    assert format_subquestions(results[1].questions) == RAW[1]["questions"][0]


def test_well_formed_answer_reply():
    qs = parse_subquestions(RAW[0]["questions"][0]).questions
    a = parse_answers(RAW[0]["answers"][0], n_questions=len(qs))
    assert a.ok and len(a.answers) == 5 and a.final_answer == "18"


@pytest.mark.parametrize(
    "index,reason",
    [
        (916, "no 'Final answer:' line"),  # the teacher stopped before a final answer
        (1201, "no 'Final answer:' line"),  # ... and said the problem is unanswerable
        (47, "not 'An:' lines"),  # it echoed the Q-lines before answering
        (8, "not 'An:' lines"),  # it added a "(Note: ...)" line
    ],
)
def test_malformed_released_answer_replies_say_why(index, reason):
    a = parse_answers(RAW[index]["answers"][0])
    assert not a.ok
    assert reason in a.reason


def test_malformed_subquestions_say_why():
    assert parse_subquestions("").reason == "empty reply"
    assert "no 'Qn:' lines" in parse_subquestions("First, find x.").reason
    assert "numbered 1..2" in parse_subquestions("Q1: a?\nQ3: b?").reason
    bad = parse_subquestions("Q1: a?\nSure, here they are")
    assert not bad.ok and "not 'Qn:' lines" in bad.reason and bad.questions == ["a?"]


def test_feedback():
    ok = parse_feedback("Q1: Yes\nQ2: No\n", 2)
    assert ok.ok and ok.votes == [True, False]
    short = parse_feedback("Q1: Yes", 2)
    assert not short.ok and "1 feedback line(s) for 2" in short.reason
    wrong = parse_feedback("Q1: Yes\nQ2: maybe", 2)
    assert not wrong.ok and "line 2" in wrong.reason
    extra = parse_feedback("Q1: Yes\nQ2: No\nQ3: Yes", 2)
    assert not extra.ok and "extra" in extra.reason


def test_doc_decomposer_reply():
    r = parse_doc_subquestions("1. How many eggs are left?\n2. What is the main question?\nDone")
    assert r.ok and r.questions == ["How many eggs are left?"]
    assert parse_doc_subquestions("No decomposition").ok
    assert not parse_doc_subquestions("I cannot help").ok
