"""Prompt templates, selectable by id; the one place prompts are written.

Verbatim texts live in `subq/templates/*.txt`:
- `paper_qg`, `paper_qa`, `paper_feedback`: GSM8K-AI-SubQ (Tarasov & Shridhar 2024), from the release's
  data_generation_and_evaluation/chatgpt_{qg,qa,feedback}.py, Apache-2.0. Sent to gpt-3.5-turbo at
  temperature 0.7 as one user message: instruction, a blank line, `Problem: {problem}\\n\\n` (QG) or
  `Problem: {problem}\\n\\n{Q-lines}\\n\\n` (QA, feedback). Their few-shot problems are GSM8K test 0-2.
- `doc_decompose`, `doc_solve`: Divide-or-Conquer? (Wu et al. 2024, arXiv 2402.15000v3, section 3),
  followed by `Question: {question}` and `Premise: {P} Question: {Q} SubQuestion: {S}`.

Families group the roles a pipeline needs: `paper` = qg/qa/feedback (generation, paper answerer),
`doc` = decompose/solve (Divide-or-Conquer's decomposer and solver).
"""

from __future__ import annotations

import re
from importlib import resources

from subq.errors import ConfigError
from subq.parsers import format_subquestions

# For open-weight answerers the release's evaluation script appends this to the QA instruction's FIRST paragraph,
# after "...without adding any additional comments after it." and one space (the few-shot examples follow unchanged).
OPEN_MODEL_SUFFIX = "Do not come up with any additional problems and process only the last problem you are given."


def _open_model_qa(text: str) -> str:
    first, sep, rest = text.partition("\n\n")
    return f"{first} {OPEN_MODEL_SUFFIX}{sep}{rest}"

SOURCES = {
    "paper_qg": "Tarasov & Shridhar 2024, GSM8K-AI-SubQ release, chatgpt_qg.py (Apache-2.0)",
    "paper_qa": "Tarasov & Shridhar 2024, GSM8K-AI-SubQ release, chatgpt_qa.py (Apache-2.0)",
    "paper_feedback": "Tarasov & Shridhar 2024, GSM8K-AI-SubQ release, chatgpt_feedback.py (Apache-2.0)",
    "doc_decompose": "Wu et al. 2024, Divide-or-Conquer?, arXiv 2402.15000v3 sec. 3 (I_decomp)",
    "doc_solve": "Wu et al. 2024, Divide-or-Conquer?, arXiv 2402.15000v3 sec. 3 (I_ans)",
}
ROLES = {"paper_qg": "qg", "paper_qa": "qa", "paper_feedback": "feedback", "doc_decompose": "qg", "doc_solve": "qa"}
FAMILIES = {
    "paper": {"qg": "paper_qg", "qa": "paper_qa", "feedback": "paper_feedback"},
    "doc": {"qg": "doc_decompose", "qa": "doc_solve", "feedback": "paper_feedback"},
}


def _read_templates() -> dict[str, str]:
    base = resources.files("subq") / "templates"
    return {t: (base / f"{t}.txt").read_text(encoding="utf-8") for t in SOURCES}


# Read once, when this module is imported, never at call time: a Ray worker can outlive the runtime-env copy of the
# package it was started from (a job's working_dir is removed from a node when its last reference there goes; Ray's
# fake multi-node cluster shares that directory between its nodes), so a teacher actor that read its QA template
# lazily after an idle actor elsewhere was scaled down failed with FileNotFoundError (seen in
# tests/test_autoscaling.py: one problem of ten recorded as failed).
_TEXTS = _read_templates()


def instruction(template_id: str) -> str:
    """The verbatim instruction text of a template."""
    if template_id not in SOURCES:
        raise ConfigError(f"unknown prompt template {template_id!r}; known: {', '.join(SOURCES)}", field="template_id")
    return _TEXTS[template_id]


def template_for(family: str, role: str) -> str:
    """Template id for a role ('qg', 'qa', 'feedback') in a family ('paper', 'doc')."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown template family {family!r}; known: {', '.join(FAMILIES)}", field="template")
    return FAMILIES[family][role]


def _split_premise(problem: str) -> tuple[str, str]:
    """GSM8K problems end with their question sentence: (premise, question)."""
    parts = re.split(r"(?<=[.!])\s+(?=[^.!?]*\?\s*$)", problem.strip(), maxsplit=1)
    return (parts[0], parts[1]) if len(parts) == 2 else ("", problem.strip())


def render(template_id: str, problem: str, questions: list[str] | None = None, open_model: bool = False) -> str:
    """The full prompt text for one problem (and its sub-questions for QA / feedback / solve)."""
    text = instruction(template_id)
    if template_id == "paper_qg":
        return f"{text}\n\nProblem: {problem}\n\n"
    if template_id in ("paper_qa", "paper_feedback"):
        if questions is None:
            raise ValueError(f"{template_id} needs the sub-questions")
        if open_model and template_id == "paper_qa":
            text = _open_model_qa(text)
        return f"{text}\n\nProblem: {problem}\n\n{format_subquestions(questions)}\n\n"
    if template_id == "doc_decompose":
        return f"{text}\n\nQuestion: {problem}"
    if template_id == "doc_solve":
        premise, question = _split_premise(problem)
        subs = " ".join(questions or [])
        return f"{text}\n\nPremise: {premise} Question: {question} SubQuestion: {subs}"
    raise ConfigError(f"unknown prompt template {template_id!r}", field="template_id")


def messages(template_id: str, problem: str, questions: list[str] | None = None, open_model: bool = False) -> list[dict]:
    """OpenAI chat messages for one call: a single user message, as in the release."""
    return [{"role": "user", "content": render(template_id, problem, questions, open_model)}]


def parse_prompt(text: str) -> tuple[str, str, list[str] | None] | None:
    """The inverse of `render`: (template_id, problem, questions) for a prompt one of our templates wrote,
    or None when the text is not one of them. Used by the local teacher server to know which kind of call
    (QG / QA / feedback / DoC decompose / DoC solve) and which problem it received. For `doc_solve` the
    problem is premise + " " + question (the renderer's split loses the whitespace between them)."""
    from subq.parsers import parse_subquestions

    for tid in SOURCES:
        head = instruction(tid)
        if tid == "paper_qa" and text.startswith(_open_model_qa(head)):
            head = _open_model_qa(head)
        if not text.startswith(head):
            continue
        rest = text[len(head):]
        if tid == "paper_qg" and rest.startswith("\n\nProblem: "):
            return tid, rest[len("\n\nProblem: "):].rstrip("\n"), None
        if tid in ("paper_qa", "paper_feedback") and rest.startswith("\n\nProblem: "):
            body = rest[len("\n\nProblem: "):].rstrip("\n")
            problem, sep, qlines = body.rpartition("\n\n")
            if not sep or not qlines.startswith("Q1:"):  # no sub-questions (e.g. single-stage QA)
                return tid, body.rstrip("\n"), []
            return tid, problem, parse_subquestions(qlines).questions
        if tid == "doc_decompose" and rest.startswith("\n\nQuestion: "):
            return tid, rest[len("\n\nQuestion: "):], None
        if tid == "doc_solve" and rest.startswith("\n\nPremise: "):
            m = re.match(r"^\n\nPremise: (.*?) Question: (.*?) SubQuestion: ?(.*)$", rest, re.DOTALL)
            if m:
                premise, question, subs = m.groups()
                problem = f"{premise} {question}".strip() if premise else question
                subqs = [s.strip() + "?" for s in subs.split("?") if s.strip()]
                return tid, problem, subqs
    return None
