"""The GSM8K-AI-SubQ row: one pyarrow schema, and readers/writers for every format we exchange.

One row per problem. A row holds the teacher's sub-question sets (QG), its answer to each set (QA),
its usefulness feedback on each set, the rewards computed from them (`subq.scoring`) and provenance.

Formats (all round-trip through `SubQRow`):
- Parquet (`write_parquet` / `read_parquet`): our columnar form, `ROW_SCHEMA`.
- `paper_raw`: the release's `qg_*_data_raw.jsonl`, one object a line:
  `problem`, `questions` (one "Q1: ..\\nQ2: .." text per set), `answers` (one QA reply per set),
  `answer` (gold text); plus `feedback` (per set, the raw feedback replies) when any set has feedback.
- `paper_chat`: the release's `test_chat.jsonl`: ONE JSON list of the raw objects, gold as a number.
- `paper_dataset`: the release's `qg_*_dataset.jsonl` training file: ONE JSON list with an entry per
  (problem, set): `question`, `answers` (sub-questions, "Qn: " stripped), `rewards`
  {`answer_correctness`, `usefulness`}, `true_answer`.
Writers use `json.dumps` defaults, which reproduce the released files byte for byte.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Iterable, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from subq import storage
from subq.errors import DataError
from subq.parsers import parse_subquestions
from subq.problems import parse_json_records, problem_id
from subq.scoring import answer_correctness, gold_number, usefulness

SCHEMA_VERSION = "1"

SET_TYPE = pa.struct(
    [
        pa.field("questions_text", pa.string()),  # raw QG reply ("Q1: ..\nQ2: ..")
        pa.field("questions", pa.list_(pa.string())),  # parsed sub-questions, "Qn: " stripped
        pa.field("answer_text", pa.string()),  # raw QA reply (null: not answered)
        pa.field("feedback_texts", pa.list_(pa.string())),  # raw feedback replies
        pa.field("answer_correctness", pa.float64()),  # paper reward (null: not scored)
        pa.field("usefulness", pa.list_(pa.float64())),  # per sub-question, fraction of "Yes"
    ]
)

ROW_SCHEMA = pa.schema(
    [
        pa.field("problem_id", pa.string(), nullable=False),  # subq.problems.problem_id(problem)
        pa.field("problem", pa.string(), nullable=False),
        pa.field("gold_answer", pa.string()),  # GSM8K solution or "#### N"
        pa.field("true_answer", pa.float64()),  # gold by the paper rule (as released)
        pa.field("source", pa.string()),  # dataset name or path the problem came from
        pa.field("source_index", pa.int64()),  # record index in that source (keeps export order)
        pa.field("sets", pa.list_(SET_TYPE)),
        pa.field("teacher_model", pa.string()),
        pa.field("template_id", pa.string()),  # prompt template family (subq.prompts)
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("cost_usd", pa.float64()),
        pa.field("attempts", pa.int64()),  # teacher calls made, retries included
        pa.field("error", pa.string()),  # null when the row is complete
    ],
    metadata={"subq.schema_version": SCHEMA_VERSION, "subq.dataset": "GSM8K-AI-SubQ"},
)
ROW_FIELDS = frozenset(ROW_SCHEMA.names)

REQUIRED_COLUMNS = ("problem_id", "problem", "sets")


@dataclass
class SubQuestionSet:
    questions_text: str
    questions: list[str]
    answer_text: str | None = None
    feedback_texts: list[str] = field(default_factory=list)
    answer_correctness: float | None = None
    usefulness: list[float] = field(default_factory=list)

    @classmethod
    def from_texts(cls, questions_text: str, answer_text: str | None, gold: str | float | None,
                   feedback_texts: list[str] | None = None) -> "SubQuestionSet":
        """Build a set from raw teacher replies, computing the paper's rewards."""
        questions = parse_subquestions(questions_text).questions
        feedback_texts = list(feedback_texts or [])
        return cls(
            questions_text=questions_text,
            questions=questions,
            answer_text=answer_text,
            feedback_texts=feedback_texts,
            answer_correctness=None if answer_text is None or gold is None else answer_correctness(answer_text, gold),
            usefulness=usefulness(feedback_texts, len(questions)),
        )


@dataclass
class SubQRow:
    problem_id: str
    problem: str
    gold_answer: str | None
    true_answer: float | None
    sets: list[SubQuestionSet]
    source: str | None = None
    source_index: int | None = None
    teacher_model: str | None = None
    template_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 0
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SubQRow":
        d = dict(d)
        d["sets"] = [s if isinstance(s, SubQuestionSet) else SubQuestionSet(**s) for s in d.get("sets") or []]
        for s in d["sets"]:
            s.questions = list(s.questions or [])
            s.feedback_texts = list(s.feedback_texts or [])
            s.usefulness = list(s.usefulness or [])
        return cls(**{k: v for k, v in d.items() if k in ROW_FIELDS})


# ---------------------------------------------------------------- Arrow / Parquet


def rows_to_table(rows: Iterable[SubQRow]) -> pa.Table:
    return pa.Table.from_pylist([r.to_dict() for r in rows], schema=ROW_SCHEMA)


def validate_table(table: pa.Table, source: str = "table") -> pa.Table:
    """Check required columns and cast to ROW_SCHEMA (missing optional columns become null)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError("missing column", field=missing[0], source=source,
                        hint=f"a GSM8K-AI-SubQ table needs {', '.join(REQUIRED_COLUMNS)}")
    cols = []
    for f in ROW_SCHEMA:
        if f.name in table.column_names:
            try:
                cols.append(table.column(f.name).cast(f.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise DataError(f"has type {table.schema.field(f.name).type}, expected {f.type}: {e}",
                                field=f.name, source=source) from e
        else:
            cols.append(pa.nulls(len(table), f.type))
    return pa.Table.from_arrays(cols, schema=ROW_SCHEMA)


def table_to_rows(table: pa.Table, source: str = "table") -> list[SubQRow]:
    return [SubQRow.from_dict(d) for d in validate_table(table, source).to_pylist()]


def write_parquet(rows: Iterable[SubQRow] | pa.Table, location: str) -> None:
    table = rows if isinstance(rows, pa.Table) else rows_to_table(rows)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(location, buf.getvalue())


def parquet_files(location: str) -> list[str]:
    """The finished Parquet files of a part directory (writers' temps skipped), or [the file] itself."""
    fs, path = storage.resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        return storage.list_files(location, ".parquet")
    return [path]


def read_parquet_table(location: str, columns: list[str] | None = None, schema: pa.Schema | None = None) -> pa.Table:
    """One Parquet file or the finished parts of a directory as one table (only `columns` when given: a column
    read, no row objects)."""
    import pyarrow.dataset as pads

    fs, _ = storage.resolve(location)
    files = parquet_files(location)
    try:
        return pads.dataset(files, filesystem=fs, format="parquet", schema=schema).to_table(columns=columns)
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"cannot read Parquet: {e}", source=str(location)) from e


def read_parquet(location: str) -> list[SubQRow]:
    """Read one Parquet file or a directory of Parquet parts (sorted by source order)."""
    table = read_parquet_table(location)
    rows = table_to_rows(table, str(location))
    return sort_rows(rows)


def sort_rows(rows: list[SubQRow]) -> list[SubQRow]:
    """Source order when known, then problem id: deterministic exports from unordered parts."""
    return sorted(rows, key=lambda r: (r.source or "", r.source_index if r.source_index is not None else -1, r.problem_id))


# ---------------------------------------------------------------- the paper's formats

PaperFormat = Literal["paper_raw", "paper_chat", "paper_dataset"]


def _gold_text(gold) -> str:
    if isinstance(gold, str):
        return gold
    if isinstance(gold, float) and gold.is_integer():
        gold = int(gold)
    return f"#### {gold}"


def row_from_raw(obj: dict, index: int, source: str) -> SubQRow:
    """One `paper_raw` / `paper_chat` object -> SubQRow (rewards recomputed by the paper rule)."""
    for key in ("problem", "questions", "answers", "answer"):
        if key not in obj:
            raise DataError(f"record {index} lacks it", field=key, source=source)
    questions = obj["questions"] if isinstance(obj["questions"], list) else [obj["questions"]]
    answers = obj["answers"] if isinstance(obj["answers"], list) else [obj["answers"]]
    feedback = obj.get("feedback") or [[] for _ in questions]
    if len(answers) > len(questions):
        raise DataError(f"record {index} has {len(answers)} answers for {len(questions)} question sets",
                        field="answers", source=source)
    gold = obj["answer"]
    sets = [
        SubQuestionSet.from_texts(q, answers[i] if i < len(answers) else None, gold,
                                  feedback[i] if i < len(feedback) else [])
        for i, q in enumerate(questions)
    ]
    return SubQRow(
        problem_id=problem_id(obj["problem"]), problem=obj["problem"], gold_answer=_gold_text(gold),
        true_answer=gold_number(gold, "paper"), sets=sets, source=source, source_index=index,
    )


def row_to_raw(row: SubQRow, gold_as_number: bool = False) -> dict:
    """SubQRow -> `paper_raw` object (or `paper_chat` with gold_as_number)."""
    obj = {
        "problem": row.problem,
        "questions": [s.questions_text for s in row.sets],
        "answers": [s.answer_text for s in row.sets if s.answer_text is not None],
        "answer": row.true_answer if gold_as_number else row.gold_answer,
    }
    if any(s.feedback_texts for s in row.sets):
        obj["feedback"] = [s.feedback_texts for s in row.sets]
    return obj


def dataset_entries(row: SubQRow) -> list[dict]:
    """SubQRow -> `paper_dataset` entries, one per scored set (unscored sets are not training data)."""
    return [
        {
            "question": row.problem,
            "answers": list(s.questions),
            "rewards": {"answer_correctness": s.answer_correctness, "usefulness": list(s.usefulness)},
            "true_answer": row.true_answer,
        }
        for s in row.sets
        if s.answer_correctness is not None
    ]


def rows_from_dataset(entries: list[dict], source: str) -> list[SubQRow]:
    """`paper_dataset` entries -> SubQRows; consecutive entries of one problem become one row."""
    rows: list[SubQRow] = []
    for i, e in enumerate(entries):
        for key in ("question", "answers", "rewards", "true_answer"):
            if key not in e:
                raise DataError(f"entry {i} lacks it", field=key, source=source)
        rewards = e["rewards"]
        if not isinstance(rewards, dict) or "answer_correctness" not in rewards:
            raise DataError(f"entry {i} lacks it", field="rewards.answer_correctness", source=source)
        s = SubQuestionSet(
            questions_text="\n".join(f"Q{j}: {q}" for j, q in enumerate(e["answers"], start=1)),
            questions=list(e["answers"]),
            answer_correctness=float(rewards["answer_correctness"]),
            usefulness=[float(u) for u in rewards.get("usefulness") or []],
        )
        if rows and rows[-1].problem == e["question"]:
            rows[-1].sets.append(s)
        else:
            true = e["true_answer"]
            rows.append(SubQRow(problem_id(e["question"]), e["question"], _gold_text(true),
                                None if true is None else float(true), [s], source=source, source_index=len(rows)))
    return rows


def dumps_paper(rows: list[SubQRow], fmt: PaperFormat) -> str:
    if fmt == "paper_raw":
        return "".join(json.dumps(row_to_raw(r)) + "\n" for r in rows)
    if fmt == "paper_chat":
        return json.dumps([row_to_raw(r, gold_as_number=True) for r in rows])
    if fmt == "paper_dataset":
        return json.dumps([e for r in rows for e in dataset_entries(r)])
    raise ValueError(f"unknown paper format {fmt!r}")


def write_paper(rows: list[SubQRow], location: str, fmt: PaperFormat) -> None:
    storage.write_bytes_atomic(location, dumps_paper(rows, fmt).encode("utf-8"))


def iter_parquet_sorted(location: str, chunk_rows: int = 20_000) -> Iterable[list[SubQRow]]:
    """The rows of a Parquet file or part directory in `sort_rows` order, as lists of at most `chunk_rows` row
    objects. Only the sort keys of every row are held at once (the sort runs on them); the parts a chunk draws
    from are decoded when it needs them and dropped when the next does not, so an output written in source order
    (as a run writes it) is read about once with a few parts in memory."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, _ = storage.resolve(location)
    files = parquet_files(location)
    keys = []
    for i, f in enumerate(files):
        try:
            pf = pq.ParquetFile(f, filesystem=fs)
            names = pf.schema_arrow.names
            t = pf.read(columns=[c for c in ("source", "source_index", "problem_id") if c in names])
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"cannot read Parquet: {e}", source=str(f)) from e
        keys.append(pa.table({
            "source": t.column("source").cast(pa.string()) if "source" in names else pa.nulls(len(t), pa.string()),
            "source_index": t.column("source_index").cast(pa.int64()) if "source_index" in names
            else pa.nulls(len(t), pa.int64()),
            "problem_id": t.column("problem_id").cast(pa.string()) if "problem_id" in names
            else pa.nulls(len(t), pa.string()),
            "_file": pa.array(np.full(len(t), i, np.int64)), "_row": pa.array(np.arange(len(t), dtype=np.int64))}))
    if not keys:
        return
    keys = pa.concat_tables(keys)
    idx = pc.sort_indices(keys, sort_keys=[("source", "ascending", "at_start"),
                                           ("source_index", "ascending", "at_start"),
                                           ("problem_id", "ascending", "at_start")])
    file_of = keys.column("_file").take(idx).to_numpy()
    row_of = keys.column("_row").take(idx).to_numpy()
    del keys, idx
    decoded: dict = {}
    for lo in range(0, len(file_of), chunk_rows):
        fi, ri = file_of[lo:lo + chunk_rows], row_of[lo:lo + chunk_rows]
        needed = np.unique(fi).tolist()
        decoded = {k: v for k, v in decoded.items() if k in needed}
        order = np.argsort(fi, kind="stable")  # chunk positions grouped by part
        pieces = []
        for k in needed:
            if k not in decoded:
                decoded[k] = validate_table(pq.read_table(files[k], filesystem=fs), str(files[k]))
            pieces.append(decoded[k].take(pa.array(ri[order[fi[order] == k]])))
        grouped = pa.concat_tables(pieces)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        yield table_to_rows(grouped.take(pa.array(inverse)), str(location))


def write_paper_chunks(chunks: Iterable[list[SubQRow]], location: str | dict, fmt: PaperFormat | None = None) -> int:
    """`write_paper` for rows arriving in chunks (large outputs), byte for byte the same file; returns the row
    count. LOCATION may be {format: location}: every file written in one pass over the chunks."""
    import contextlib

    targets = location if isinstance(location, dict) else {fmt: location}
    n = 0
    with contextlib.ExitStack() as stack:
        files = {f: stack.enter_context(storage.open_atomic(loc)) for f, loc in targets.items()}
        first = dict.fromkeys(files, True)
        for f, out in files.items():
            if f != "paper_raw":
                out.write(b"[")
        for rows in chunks:
            n += len(rows)
            for f, out in files.items():
                if f == "paper_raw":
                    out.write(dumps_paper(rows, f).encode("utf-8"))
                    continue
                items = [row_to_raw(r, gold_as_number=True) for r in rows] if f == "paper_chat" else \
                    [e for r in rows for e in dataset_entries(r)]
                if items:
                    out.write((("" if first[f] else ", ") + ", ".join(json.dumps(i) for i in items)).encode("utf-8"))
                    first[f] = False
        for f, out in files.items():
            if f != "paper_raw":
                out.write(b"]")
    return n


def detect_format(location: str, data: bytes | None = None) -> str:
    """'parquet', 'paper_raw', 'paper_chat' or 'paper_dataset' for a file or directory."""
    if str(location).endswith(".parquet") or storage.list_files(location, ".parquet"):
        return "parquet"
    data = storage.read_bytes(location) if data is None else data
    head = data[:65536].decode("utf-8", errors="replace").lstrip()
    if not head:
        raise DataError("file is empty", source=str(location))
    if head.startswith("["):
        return "paper_dataset" if '"rewards"' in head[:5000] and '"true_answer"' in head[:5000] else "paper_chat"
    return "paper_raw"


def read_rows(location: str) -> list[SubQRow]:
    """Read GSM8K-AI-SubQ rows from any supported format (auto-detected)."""
    location = str(location)
    if str(location).endswith(".parquet") or storage.list_files(location, ".parquet"):
        return read_parquet(location)
    data = storage.read_bytes(location)
    fmt = detect_format(location, data)
    records = parse_json_records(data, location)
    if not records:
        raise DataError("contains no records", source=location)
    if fmt == "paper_dataset":
        return rows_from_dataset(records, location)
    return [row_from_raw(r, i, location) for i, r in enumerate(records)]
