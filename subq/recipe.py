"""The paper's per-problem recipe (GSM8K-AI-SubQ): which gold the teacher may see, the validators of each
reply, the calls that follow a QG reply, and how a sub-question set and a row are built from the replies. Shared by
online generation (inside the actors) and the Batch API path; prompts, parsers, schema and scoring only."""

from __future__ import annotations


def release_gold(gold_answer: str) -> str:
    """The gold as the release's generator saw it: "#### N" (the text after the last ####). The paper's rewards
    take the FIRST number of the gold string, so a GSM8K worked solution must not be passed as is."""
    return "#### " + gold_answer.rsplit("####", 1)[-1].strip() if "####" in gold_answer else gold_answer


def validators(family: str):
    from subq.parsers import DOC_ANSWER, FINAL_ANSWER, parse_doc_subquestions, parse_feedback, parse_subquestions

    def qg(text):
        qs = (parse_doc_subquestions(text) if family == "doc" else parse_subquestions(text)).questions
        return None if qs else "no sub-questions in the QG reply"

    def qa(text):
        marker = DOC_ANSWER if family == "doc" else FINAL_ANSWER
        return None if marker.search(text or "") else "no final-answer marker in the QA reply"

    def feedback(n):
        return lambda text: parse_feedback(text, n).reason

    return qg, qa, feedback


def calls_after_qg(family: str, problem: str, set_index: int, n_feedback: int, questions: list[str]) -> list[tuple]:
    """The calls a set makes once its QG reply is parsed: [(stage, template id, sample index, messages)], QA
    first, then the feedback calls (both read only the problem and the sub-questions). Online and batch mode use
    the same sample indices, so both hit the same request-cache entries."""
    from subq.prompts import messages, template_for

    qa, fb = template_for(family, "qa"), template_for(family, "feedback")
    return [("qa", qa, set_index, messages(qa, problem, questions))] + [
        ("feedback", fb, set_index * n_feedback + j, messages(fb, problem, questions)) for j in range(n_feedback)]


def split_qg(family: str, qg_text: str) -> tuple[list[str], str]:
    """A QG reply -> (its sub-questions, the set's questions text as stored in the row)."""
    from subq.parsers import format_subquestions, parse_doc_subquestions, parse_subquestions

    if family == "doc":
        qs = parse_doc_subquestions(qg_text).questions
        return qs, format_subquestions(qs)
    return parse_subquestions(qg_text).questions, qg_text


def build_set(family: str, qtext: str, answer_text: str, gold: str, feedback_texts: list[str]):
    """One SubQuestionSet from its replies, with the paper's rewards."""
    from subq.schema import SubQuestionSet

    sset = SubQuestionSet.from_texts(qtext, answer_text, gold, feedback_texts)
    if family == "doc":  # DoC answers end "The answer is: X", which the paper rule cannot read; strict can
        from subq.scoring import score

        sset.answer_correctness = 1.0 if score(answer_text, gold, "strict").correct else 0.0
    return sset


def build_row(item: dict, sets: list, job: dict, acct: dict):
    """A problem's SubQRow from its sets and its call accounting (prompt/completion tokens, cost, attempts)."""
    from subq.schema import SubQRow
    from subq.scoring import gold_number

    gold = release_gold(item["gold_answer"])
    return SubQRow(
        problem_id=item["problem_id"], problem=item["problem"], gold_answer=gold,
        true_answer=gold_number(gold, "paper"), sets=list(sets), source=item["source"],
        source_index=item["source_index"], teacher_model=job["model"], template_id=job["template"],
        prompt_tokens=acct["prompt_tokens"], completion_tokens=acct["completion_tokens"], cost_usd=acct["cost_usd"],
        attempts=acct["attempts"], error=None)
