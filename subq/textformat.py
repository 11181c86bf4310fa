"""The decomposer's text format: ONE definition, used by training (targets, loss masks, rewards)
and by serving (prompts, parsing generations), so a model is served as it was trained.

`paper` (Tarasov & Shridhar 2024): prompt `problem + "\\n"`, target `" <QUE> q1 </QUE> <QUE> q2 </QUE>"`.
`qlines` (ours): prompt `"Problem: {problem}\\nSub-questions:\\n"`, target `"Q1: q1\\nQ2: q2\\n"`.
Both end with the tokenizer's EOS token, appended by the training code.

Token ids (`prompt_ids`, `special_prefix`): the one text contract of training and serving. A prompt is the
tokenizer's own special prefix (BOS for Llama/Mistral-style tokenizers, nothing for GPT-2), then the prompt text
tokenized WITHOUT special tokens, cut from the LEFT when it is longer than its budget (a GSM8K problem ends with its
question, which must survive). The target follows, tokenized without special tokens, then EOS. With `prompt_format="chat"` (instruct students)
the prompt text is the user message of the tokenizer's chat template (with the generation prompt). Serving stops
at EOS;
a decomposition that reached its token budget first is reported as "no EOS".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from subq.errors import ConfigError

# Decode budget: the release allowed the reference length + 200 tokens; 9% of the released test sub-question sets
# are longer than 128 tokens of the tiny tokenizer, so every default (validation, serving, evaluation) is >= 256.
DEFAULT_MAX_NEW_TOKENS = 256

QUE_OPEN, QUE_CLOSE = "<QUE>", "</QUE>"


@dataclass(frozen=True)
class DecomposerFormat:
    name: str

    def prompt(self, problem: str) -> str:
        if self.name == "paper":
            return problem + "\n"
        return f"Problem: {problem}\nSub-questions:\n"

    def target_with_spans(self, questions: list[str]) -> tuple[str, list[tuple[int, int]]]:
        """The target text and, per sub-question, its (start, end) character span in it.
        The last token of span i is where the dense reward usefulness[i] is placed."""
        text, spans = "", []
        for i, q in enumerate(questions, start=1):
            piece = f" {QUE_OPEN} {q} {QUE_CLOSE}" if self.name == "paper" else f"Q{i}: {q}\n"
            spans.append((len(text), len(text) + len(piece)))
            text += piece
        return text, spans

    def target(self, questions: list[str]) -> str:
        return self.target_with_spans(questions)[0]

    def parse(self, generation: str) -> list[str]:
        """Sub-questions from a generated continuation (the text after the prompt)."""
        if self.name == "paper":
            found = re.findall(rf"{re.escape(QUE_OPEN)}(.*?){re.escape(QUE_CLOSE)}", generation, re.S)
            return [q.strip() for q in found if q.strip()]
        return [m.group(1).strip() for m in re.finditer(r"^Q\d+:\s?(.*)$", generation, re.M) if m.group(1).strip()]

    @property
    def stop(self) -> str | None:
        """A string after which generation may stop early (None: stop at EOS only)."""
        return None


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts in front of a text when asked for special tokens ([BOS] or [])."""
    with_sp = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for i in range(len(with_sp) - len(plain) + 1):
        if with_sp[i:i + len(plain)] == plain:
            return with_sp[:i]
    return []


PROMPT_FORMATS = ("plain", "chat")
_MARK = "\u2063SUBQ\u2063"


def chat_frame(tokenizer) -> tuple[list[int], list[int]]:
    """(ids before, ids after) the user message in the tokenizer's chat template with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the tokenizer has no chat template", field="prompt_format", hint="use --prompt-format plain")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False,
                                         add_generation_prompt=True)
    head, tail = text.split(_MARK, 1)
    enc = lambda t: list(tokenizer(t, add_special_tokens=False)["input_ids"]) if t else []  # noqa: E731
    return enc(head), enc(tail)


def prompt_ids(tokenizer, fmt: "DecomposerFormat", problem: str, max_tokens: int | None = None,
               prompt_format: str = "plain") -> list[int]:
    """The prompt's token ids, identical in training and serving: special prefix (plain) or the chat template's
    frame around the user message (chat), and the prompt text (no special tokens) cut from the left so that the
    whole fits `max_tokens` (None: no limit)."""
    if prompt_format == "chat":
        head, tail = chat_frame(tokenizer)
        text = fmt.prompt(problem).rstrip("\n")
    else:
        head, tail = special_prefix(tokenizer), []
        text = fmt.prompt(problem)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if max_tokens is not None:
        keep = max(1, max_tokens - len(head) - len(tail))
        ids = ids[-keep:]
    return head + ids + tail


FORMATS = {"paper": DecomposerFormat("paper"), "qlines": DecomposerFormat("qlines")}


def get_format(name: str) -> DecomposerFormat:
    if name not in FORMATS:
        raise ConfigError(f"unknown decomposer text format {name!r}; known: {', '.join(FORMATS)}", field="text_format")
    return FORMATS[name]
