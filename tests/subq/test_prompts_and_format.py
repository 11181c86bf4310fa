import re
from pathlib import Path

import pytest

from subq import prompts
from subq.errors import ConfigError
from subq.textformat import get_format

SHARED_PROMPTS = Path(__file__).resolve().parents[3] / "shared" / "docs" / "paper-prompts.md"


@pytest.mark.skipif(not SHARED_PROMPTS.exists(), reason="shared/docs not beside the checkout")
def test_templates_are_verbatim():
    blocks = re.findall(r"```text\n(.*?)\n```", SHARED_PROMPTS.read_text(), re.S)
    ids = ["paper_qg", "paper_qa", "paper_feedback", "doc_decompose", "doc_solve"]
    for tid, block in zip(ids, blocks):
        assert prompts.instruction(tid) == block, tid


@pytest.mark.skipif(not SHARED_PROMPTS.exists(), reason="shared/docs not beside the checkout")
def test_open_weight_answerer_prompt_matches_release_byte_for_byte():
    doc = SHARED_PROMPTS.read_text()
    qa = re.findall(r"```text\n(.*?)\n```", doc, re.S)[1]
    anchor = "without adding any additional comments after it."
    assert anchor in doc and "follows one space and" in doc  # what the document says the release does
    expected_instruction = qa.replace(anchor, anchor + " " + prompts.OPEN_MODEL_SUFFIX, 1)
    rendered = prompts.render("paper_qa", "How many?", ["a?"], open_model=True)
    assert rendered == expected_instruction + "\n\nProblem: How many?\n\nQ1: a?\n\n"
    assert rendered.encode() == (expected_instruction + "\n\nProblem: How many?\n\nQ1: a?\n\n").encode()
    assert prompts.parse_prompt(rendered) == ("paper_qa", "How many?", ["a?"])


def test_render_appends_problem_as_released():
    qg = prompts.render("paper_qg", "How many?")
    assert qg.endswith("\n\nProblem: How many?\n\n") and qg.startswith("You are given mathematical problems")
    qa = prompts.render("paper_qa", "How many?", ["a?", "b?"])
    assert qa.endswith("Problem: How many?\n\nQ1: a?\nQ2: b?\n\n")
    assert prompts.OPEN_MODEL_SUFFIX in prompts.render("paper_qa", "x", ["a?"], open_model=True)
    solve = prompts.render("doc_solve", "Tom has 3 apples. He eats 1. How many are left?", ["How many eaten?"])
    assert solve.endswith("Premise: Tom has 3 apples. He eats 1. Question: How many are left? SubQuestion: How many eaten?")
    assert prompts.messages("paper_qg", "x") == [{"role": "user", "content": prompts.render("paper_qg", "x")}]
    assert prompts.template_for("paper", "feedback") == "paper_feedback"
    with pytest.raises(ConfigError, match="unknown prompt template"):
        prompts.render("mine", "x")


@pytest.mark.parametrize("name", ["paper", "qlines"])
def test_decomposer_format_round_trip(name):
    fmt = get_format(name)
    qs = ["How many eggs?", "How much money?"]
    text, spans = fmt.target_with_spans(qs)
    assert fmt.parse(text) == qs
    assert [text[a:b] for a, b in spans] and "".join(text[a:b] for a, b in spans) == text
    assert all(q in text[a:b] for q, (a, b) in zip(qs, spans))


def test_paper_decomposer_format_matches_paper():
    fmt = get_format("paper")
    assert fmt.prompt("Problem text") == "Problem text\n"
    assert fmt.target(["a?", "b?"]) == " <QUE> a? </QUE> <QUE> b? </QUE>"
    with pytest.raises(ConfigError):
        get_format("xml")


def test_templates_are_read_when_the_module_is_imported_not_at_call_time(monkeypatch, tmp_path):
    """A teacher actor must not read the package's files after it started: on a node, a job's runtime-env copy of
    the package can be removed under a live worker (seen on Ray's fake multi-node autoscaler: one problem failed with
    FileNotFoundError on subq/templates/paper_qa.txt). Here every template file vanishes after import."""
    import importlib
    from importlib import resources

    import subq.prompts as prompts

    prompts = importlib.reload(prompts)  # a fresh import, as a new worker does
    monkeypatch.setattr(resources, "files", lambda *a, **k: tmp_path / "gone")
    for tid in prompts.SOURCES:
        assert prompts.instruction(tid).strip(), tid
    assert "Tom has 2 apples." in prompts.render("paper_qa", "Tom has 2 apples. How many?", ["How many?"])
