"""Training data: GSM8K-AI-SubQ rows -> per-set examples -> token tensors with the loss mask and per-token rewards.

Rows come from `subq.schema.read_rows` (our Parquet or the paper's files). The text is built ONLY with
`subq.textformat` (prompt_ids + target_with_spans); the prompt and the target are tokenized separately, as the
decomposer sees them at inference (the same prompt ids, then generated tokens), and EOS is appended.
- target_mask: 1 on sub-question tokens and the EOS, 0 on the problem and on padding.
- rewards (ILQL): sparse = answer_correctness on EOS; dense = usefulness[i] on the last token of sub-question i
  (from the character spans) + answer_correctness on EOS.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from subq.errors import DataError
from subq.schema import SubQRow, read_rows
from subq import textformat
from subq.textformat import DecomposerFormat


@dataclass
class Example:
    problem_id: str
    problem: str
    questions: list[str]
    correctness: float | None = None
    usefulness: list[float] = field(default_factory=list)


@dataclass
class ValProblem:
    problem_id: str
    problem: str
    references: list[list[str]]  # every teacher sub-question set of this problem


def read_training_rows(location: str, what: str = "data") -> list[SubQRow]:
    from pathlib import Path

    p = Path(location)
    if "://" not in str(location) and p.is_dir() and not any(
            f.suffix in (".parquet", ".json", ".jsonl") for f in p.rglob("*") if f.is_file()):
        raise DataError("is an empty directory (no .parquet/.json/.jsonl files): nothing to train on yet", field=what,
                        source=str(location), hint="point at `subq generate`'s parts directory once it holds parts")
    try:
        rows = read_rows(location)
    except DataError:
        raise
    except (OSError, FileNotFoundError) as e:
        raise DataError(f"cannot read: {e}", field=what, source=str(location)) from e
    if not rows:
        raise DataError("holds no rows", field=what, source=str(location))
    return rows


def select_examples(rows: list[SubQRow], algo: str, rewards: str, filter_threshold: float = 1.0,
                    source: str = "data") -> tuple[list[Example], dict]:
    """One example per usable set. BC: every set with sub-questions; Filtered BC: sets with
    answer_correctness >= threshold; ILQL: sets with answer_correctness (+ usefulness per sub-question for dense).
    Returns (examples, counts). Raises DataError (naming the field) when nothing usable is left."""
    out: list[Example] = []
    stats = {"rows": len(rows), "sets": 0, "empty": 0, "unscored": 0, "filtered_out": 0, "no_usefulness": 0}
    for row in rows:
        for s in row.sets:
            stats["sets"] += 1
            if not s.questions:
                stats["empty"] += 1
                continue
            if algo in ("filtered_bc", "ilql") and s.answer_correctness is None:
                stats["unscored"] += 1
                continue
            if algo == "filtered_bc" and s.answer_correctness < filter_threshold:
                stats["filtered_out"] += 1
                continue
            if algo == "ilql" and rewards == "dense" and len(s.usefulness) != len(s.questions):
                stats["no_usefulness"] += 1
                continue
            out.append(Example(row.problem_id, row.problem, list(s.questions), s.answer_correctness, list(s.usefulness)))
    stats["used"] = len(out)
    if not out:
        if algo == "ilql" and rewards == "dense" and stats["no_usefulness"]:
            raise DataError(f"no set has usefulness for each sub-question ({stats['no_usefulness']} lack it): dense "
                            "ILQL needs the teacher's feedback", field="usefulness", source=source,
                            hint="use --rewards sparse, or data generated with feedback")
        if algo in ("filtered_bc", "ilql") and stats["unscored"]:
            raise DataError(f"no set has a reward ({stats['unscored']} unscored): {algo} needs rewards",
                            field="answer_correctness", source=source)
        if algo == "filtered_bc":
            raise DataError(f"no set has answer_correctness >= {filter_threshold}", field="answer_correctness",
                            source=source)
        raise DataError("no set has sub-questions", field="sets.questions", source=source)
    return out, stats


def split_problems(rows: list[SubQRow], val_fraction: float) -> tuple[list[SubQRow], list[SubQRow]]:
    """Deterministic hold-out by problem id hash (a problem's sets never straddle the split)."""
    if val_fraction <= 0 or len(rows) < 2:
        return rows, []
    n_val = max(1, round(len(rows) * val_fraction))
    order = sorted(rows, key=lambda r: hashlib.sha256(r.problem_id.encode()).hexdigest())
    val_ids = {r.problem_id for r in order[:n_val]}
    return [r for r in rows if r.problem_id not in val_ids], [r for r in rows if r.problem_id in val_ids]


def val_problems(rows: list[SubQRow], limit: int | None) -> list[ValProblem]:
    """The validation problems with at least one sub-question set: the first `limit` (None: all)."""
    out = []
    for r in rows:
        if limit is not None and len(out) >= limit:
            break
        refs = [list(s.questions) for s in r.sets if s.questions]
        if refs:
            out.append(ValProblem(r.problem_id, r.problem, refs))
    return out


def encode(ex: Example, tokenizer, fmt: DecomposerFormat, max_length: int, rewards: str | None = None,
           prompt_format: str = "plain") -> dict | None:
    """Example -> {input_ids, target_mask, rewards} (python lists), or None if the target alone exceeds max_length.
    rewards None: all zeros (BC)."""
    target, spans = fmt.target_with_spans(ex.questions)
    enc = tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
    tgt_ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    eos = tokenizer.eos_token_id
    tgt_ids.append(eos)
    # the problem's end (its question) is kept next to the target; BOS stays in front (subq.textformat)
    prompt_ids = textformat.prompt_ids(tokenizer, fmt, ex.problem, max_length - len(tgt_ids), prompt_format)
    if len(prompt_ids) + len(tgt_ids) > max_length:
        return None
    r = [0.0] * len(tgt_ids)
    if rewards is not None:
        if rewards == "dense":
            for (_, end), u in zip(spans, ex.usefulness):
                last = max((i for i, (s, _) in enumerate(offsets) if s < end), default=None)
                if last is not None:
                    r[last] += float(u)
        r[-1] += float(ex.correctness or 0.0)
    return {"input_ids": prompt_ids + tgt_ids, "target_mask": [0] * len(prompt_ids) + [1] * len(tgt_ids),
            "rewards": [0.0] * len(prompt_ids) + r}


def collate(items: list[dict], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, target_mask, rewards ([B, T])."""
    import torch

    T = max(len(it["input_ids"]) for it in items)
    B = len(items)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    tmask = torch.zeros((B, T), dtype=torch.long)
    rew = torch.zeros((B, T), dtype=torch.float32)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n] = torch.tensor(it["input_ids"])
        attn[i, :n] = 1
        tmask[i, :n] = torch.tensor(it["target_mask"])
        rew[i, :n] = torch.tensor(it["rewards"])
    return {"input_ids": ids, "attention_mask": attn, "target_mask": tmask, "rewards": rew}


def batches(encoded: list[dict], batch_size: int, rank: int, world: int, seed: int, start_batch: int = 0):
    """Endless per-rank micro batches: each epoch a seeded shuffle, rank r takes every world-th batch.
    start_batch skips that many of this rank's batches (resume keeps the data order)."""
    n_batches = max(1, len(encoded) // (batch_size * world)) if len(encoded) >= batch_size * world else 1
    k, epoch = 0, 0
    while True:
        order = list(range(len(encoded)))
        random.Random(seed + epoch).shuffle(order)
        while len(order) < batch_size * world:  # tiny datasets: repeat to fill one global batch
            order += order[: batch_size * world - len(order)]
        for b in range(n_batches):
            if k >= start_batch:
                idx = order[(b * world + rank) * batch_size:(b * world + rank + 1) * batch_size]
                yield [encoded[i] for i in idx]
            k += 1
        epoch += 1
