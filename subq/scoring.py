"""Scoring replies against GSM8K gold answers, and the paper's rewards.

Modes:
- `paper`: exactly the GSM8K-AI-SubQ release, quirks included. The release lower-cases the reply, takes
  `idx = reply.find("final answer:")` and reads the first number of `reply[idx + 13:]`. Prediction = the first
  number after the first "final answer:"; when the marker is MISSING, `find` returns -1 and the release reads
  the first number after the 12th character of the reply (`reply[12:]`) instead of counting a miss (several
  published open-model accuracies include such replies). Gold = first number of the gold string (thousands
  separators are NOT dropped: gold "#### 2,125" scores as 2, which the released `answer_correctness` reflects).
  Replies without the marker are still counted (`missing_final_answer`).
- `strict`: lm-eval's strict match, generalised to the answer markers our prompts ask for: the number
  right after the FIRST `####`, `Final answer:` or `The answer is:` (commas and `$` dropped), as lm-eval's
  strict-match filter takes its first match. A reply without a marker is a miss.
- `flexible`: lm-eval's flexible extract: the last number anywhere in the reply.
Every mode counts the replies without an answer marker (`missing_final_answer`; for `flexible`, the strict
markers), so a report can say how many replies its accuracy rests on a fallback for.
For strict and flexible, gold = the number after `####` (or the first number), commas dropped.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Iterable, Literal

Mode = Literal["paper", "strict", "flexible"]
MODES: tuple[Mode, ...] = ("paper", "strict", "flexible")

PAPER_NUMBER = re.compile(r"[-+]?\d*\.\d+|\d+")  # the release's number pattern
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
STRICT_MARKER = re.compile(r"(?:####|final answer:|the answer is:?)\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)?", re.IGNORECASE)
FINAL_MARKER = "final answer:"


@dataclass(frozen=True)
class Score:
    correct: bool
    predicted: float | None
    gold: float | None
    missing_final_answer: bool  # the reply had no answer marker the mode requires

    def to_dict(self) -> dict:
        return asdict(self)


def _to_float(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def paper_number(text: str) -> float | None:
    """First number in `text` by the release's pattern (no comma handling)."""
    m = PAPER_NUMBER.search(text)
    return float(m.group()) if m else None


def gold_number(gold: str | float | int, mode: Mode = "paper") -> float | None:
    """The gold answer as a number, by `mode`'s rule. Numbers pass through."""
    if isinstance(gold, (int, float)):
        return float(gold)
    if mode == "paper":
        return paper_number(gold)
    tail = gold.rsplit("####", 1)[-1]
    m = NUMBER.search(tail)
    return _to_float(m.group()) if m else None


def extract_answer(reply: str, mode: Mode) -> tuple[float | None, bool]:
    """(predicted number or None, missing_marker) for one reply."""
    if mode == "paper":
        idx = reply.lower().find(FINAL_MARKER)  # -1 when missing: the release then reads reply[12:]
        return paper_number(reply.lower()[idx + len(FINAL_MARKER):]), idx < 0
    if mode == "strict":
        first = STRICT_MARKER.search(reply)
        if not first:
            return None, True
        num = first.group(1)
        return (_to_float(num) if num else None), False
    if mode == "flexible":
        found = NUMBER.findall(reply)
        return (_to_float(found[-1].rstrip(".")) if found else None), STRICT_MARKER.search(reply) is None
    raise ValueError(f"unknown scoring mode {mode!r}; choose one of {', '.join(MODES)}")


def score(reply: str | None, gold: str | float | int, mode: Mode = "paper") -> Score:
    """Score one reply against one gold answer."""
    g = gold_number(gold, mode)
    if reply is None:
        return Score(False, None, g, True)
    pred, missing = extract_answer(reply, mode)
    if mode == "paper":
        correct = pred is not None and g is not None and pred == g
    else:
        correct = pred is not None and g is not None and math.isclose(pred, g, rel_tol=0, abs_tol=1e-6)
    return Score(correct, pred, g, missing)


def answer_correctness(reply: str | None, gold: str | float | int) -> float:
    """The paper's reward: 1.0 if the paper rule scores the reply correct, else 0.0."""
    return 1.0 if score(reply, gold, "paper").correct else 0.0


def usefulness(feedback_replies: list[str], n_questions: int) -> list[float]:
    """The paper's usefulness[i]: the fraction of feedback replies whose i-th non-empty line contains
    "yes" (case-insensitive); a reply with fewer lines counts as "no" for the missing ones."""
    if not feedback_replies:
        return []
    votes = [[False] * n_questions for _ in feedback_replies]
    for r, reply in enumerate(feedback_replies):
        lines = [line for line in (reply or "").split("\n") if line.strip()]
        for i, line in enumerate(lines[:n_questions]):
            votes[r][i] = "yes" in line.lower()
    return [sum(v[i] for v in votes) / len(votes) for i in range(n_questions)]


def summarize(scores: Iterable[Score]) -> dict:
    """n, correct, accuracy and missing_final_answer over scores."""
    scores = list(scores)
    n = len(scores)
    correct = sum(s.correct for s in scores)
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "missing_final_answer": sum(s.missing_final_answer for s in scores),
    }


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (Wilson 1927); (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for paired binary outcomes: b = only the first correct, c = only the second
    correct (a binomial test of min(b, c) successes in b + c trials at p = 0.5); 1.0 when b + c == 0."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)
