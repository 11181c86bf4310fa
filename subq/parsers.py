"""Parsers for teacher/decomposer/solver replies. Each returns a structured result that says *why*
a reply is malformed (`ok` is False and `reason` names the problem); none silently falls back.

Formats (GSM8K-AI-SubQ, Tarasov & Shridhar 2024):
- sub-questions: one `Qn: ...` per line, numbered from 1;
- answers: one `An: ...` per sub-question, then `Final answer: N`;
- feedback: one `Qn: Yes/No` per sub-question.
Divide-or-Conquer (Wu et al. 2024): sub-questions are the lines that contain "?" (and not the words
"main question"); "No decomposition" is a valid, empty decomposition; the solver ends "The answer is: X".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

Q_LINE = re.compile(r"^Q(\d+):\s?(.*)$")
A_LINE = re.compile(r"^A(\d+):\s?(.*)$")
FINAL_ANSWER = re.compile(r"final answer:", re.IGNORECASE)
DOC_ANSWER = re.compile(r"the answer is:?", re.IGNORECASE)


@dataclass
class SubQuestions:
    """Parsed sub-question block. `questions` have the `Qn: ` prefix stripped (trailing text kept as is)."""

    questions: list[str]
    ok: bool = True
    reason: str | None = None
    ignored_lines: list[str] = field(default_factory=list)


@dataclass
class Answers:
    """Parsed answer block: per-sub-question answers plus the final-answer text (None when absent)."""

    answers: list[str]
    final_answer: str | None
    ok: bool = True
    reason: str | None = None


@dataclass
class Feedback:
    """Parsed usefulness feedback: one vote per sub-question (True = "Yes")."""

    votes: list[bool]
    ok: bool = True
    reason: str | None = None


def _fail(result, reason: str):
    result.ok = False
    result.reason = reason
    return result


def parse_subquestions(text: str) -> SubQuestions:
    """Parse a `Q1: ...\\nQ2: ...` block (the paper's QG reply and our decomposer's output)."""
    if text is None or not text.strip():
        return _fail(SubQuestions([]), "empty reply")
    questions, ignored, numbers = [], [], []
    for line in text.split("\n"):
        m = Q_LINE.match(line)
        if m:
            numbers.append(int(m.group(1)))
            questions.append(m.group(2))
        elif line.strip():
            ignored.append(line)
    result = SubQuestions(questions, ignored_lines=ignored)
    if not questions:
        return _fail(result, f"no 'Qn:' lines (first line: {text.strip().splitlines()[0][:80]!r})")
    if numbers != list(range(1, len(numbers) + 1)):
        return _fail(result, f"sub-questions not numbered 1..{len(numbers)}: got {numbers}")
    if any(not q.strip() for q in questions):
        return _fail(result, "an empty sub-question")
    if ignored:
        return _fail(result, f"{len(ignored)} line(s) that are not 'Qn:' lines, e.g. {ignored[0][:80]!r}")
    return result


def parse_answers(text: str, n_questions: int | None = None) -> Answers:
    """Parse an `A1: ...` block ending `Final answer: N` (the paper's QA reply / answerer output)."""
    if text is None or not text.strip():
        return _fail(Answers([], None), "empty reply")
    m = FINAL_ANSWER.search(text)
    body, final = (text[: m.start()], text[m.end():].strip()) if m else (text, None)
    answers, numbers, other = [], [], []
    for line in body.split("\n"):
        am = A_LINE.match(line.strip())
        if am:
            numbers.append(int(am.group(1)))
            answers.append(am.group(2))
        elif line.strip():
            other.append(line)
    result = Answers(answers, final)
    if final is None:
        return _fail(result, "no 'Final answer:' line")
    if not final:
        return _fail(result, "'Final answer:' is empty")
    if not answers:
        return _fail(result, "no 'An:' lines")
    if numbers != list(range(1, len(numbers) + 1)):
        return _fail(result, f"answers not numbered 1..{len(numbers)}: got {numbers}")
    if n_questions is not None and len(answers) != n_questions:
        return _fail(result, f"{len(answers)} answers for {n_questions} sub-questions")
    if other:
        return _fail(result, f"{len(other)} line(s) that are not 'An:' lines, e.g. {other[0][:80]!r}")
    return result


def parse_feedback(text: str, n_questions: int) -> Feedback:
    """Parse a `Q1: Yes\\nQ2: No` feedback reply.

    Votes follow the released rule: the i-th non-empty line counts as useful iff it contains "yes"
    (case-insensitive). A reply is malformed if it does not have exactly one `Qi: Yes/No` line per
    sub-question, in order; the votes are still returned so the caller can decide (re-sample)."""
    if text is None or not text.strip():
        return _fail(Feedback([]), "empty reply")
    lines = [line for line in text.split("\n") if line.strip()]
    votes = ["yes" in line.lower() for line in lines[:n_questions]]
    result = Feedback(votes)
    if len(lines) < n_questions:
        return _fail(result, f"{len(lines)} feedback line(s) for {n_questions} sub-questions")
    for i, line in enumerate(lines[:n_questions], start=1):
        m = re.match(rf"^\s*Q{i}:\s*<?(yes|no)>?\s*\.?\s*$", line, re.IGNORECASE)
        if not m:
            return _fail(result, f"line {i} is not 'Q{i}: Yes/No': {line[:80]!r}")
    if len(lines) > n_questions:
        return _fail(result, f"{len(lines) - n_questions} extra line(s) after Q{n_questions}")
    return result


def parse_doc_subquestions(text: str) -> SubQuestions:
    """Divide-or-Conquer decomposer reply: the lines containing '?' (not 'main question');
    'No decomposition' is a valid empty result."""
    if text is None or not text.strip():
        return _fail(SubQuestions([]), "empty reply")
    questions, ignored = [], []
    for line in text.split("\n"):
        if "?" in line and "main question" not in line.lower():
            questions.append(re.sub(r"^\s*(?:Q?\d+[:.)]|[-*])\s*", "", line).strip())
        elif line.strip():
            ignored.append(line)
    result = SubQuestions(questions, ignored_lines=ignored)
    if not questions and "no decomposition" not in text.lower():
        return _fail(result, "no line with '?' and no 'No decomposition'")
    return result


def format_subquestions(questions: list[str]) -> str:
    """The inverse of parse_subquestions: `Q1: ...\\nQ2: ...`."""
    return "\n".join(f"Q{i}: {q}" for i, q in enumerate(questions, start=1))
