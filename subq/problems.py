"""GSM8K problems: loading by name or path, and stable problem ids.

Names: `gsm8k:train`, `gsm8k:test`, `gsm8k:test_socratic` (the vendored copies, MIT) and
`gsm8k-ai-subq:test` (the released raw test file, Apache-2.0). Paths: `.jsonl`, `.json` (a JSON
list) or `.parquet`, local or any pyarrow filesystem URI. A record needs a problem text
(`question` or `problem`) and a gold answer (`answer`, `gold_answer` or `true_answer`).

A problem id is a content hash of the problem text (whitespace-trimmed), so the same problem has
the same id in GSM8K, in the paper's files, in our Parquet output and in evaluation reports,
whatever file or line it came from.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from subq import storage
from subq.errors import DataError

DATA_DIR = Path(str(resources.files("subq") / "data"))

NAMED_SOURCES = {
    "gsm8k:train": DATA_DIR / "gsm8k" / "train.jsonl",
    "gsm8k:test": DATA_DIR / "gsm8k" / "test.jsonl",
    "gsm8k:test_socratic": DATA_DIR / "gsm8k" / "test_socratic.jsonl",
    "gsm8k-ai-subq:test": DATA_DIR / "gsm8k-ai-subq" / "qg_test_data_raw.jsonl",
}

# The paper's few-shot prompts quote GSM8K test items 0-2; evaluation on test flags them.
FEW_SHOT_TEST_INDICES = (0, 1, 2)

PROBLEM_KEYS = ("question", "problem")
GOLD_KEYS = ("answer", "gold_answer", "true_answer")


def problem_id(problem: str) -> str:
    """Stable id of a problem: `p` + the first 16 hex digits of sha256(problem.strip())."""
    return "p" + hashlib.sha256(problem.strip().encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Problem:
    problem_id: str
    problem: str
    gold_answer: str  # GSM8K's worked solution ending "#### N", or the released "#### N" / a number as text
    source: str  # where it was read from (name or path)
    index: int  # line / record index within the source

    @property
    def is_few_shot_example(self) -> bool:
        """True for the GSM8K test items the paper's prompts quote as few-shot examples."""
        return self.source in ("gsm8k:test", "gsm8k-ai-subq:test") and self.index in FEW_SHOT_TEST_INDICES


def parse_json_records(data: bytes, source: str) -> list[dict]:
    text = data.decode("utf-8")
    if not text.strip():
        raise DataError("file is empty", source=source)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON: {e}", source=source) from e
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"line {lineno} is not valid JSON: {e.msg}", source=source) from e
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DataError(f"record {i} is a {type(r).__name__}, expected an object", source=source)
    return records


def _first_key(record: dict, keys: tuple[str, ...], what: str, source: str, index: int) -> str:
    for k in keys:
        if k in record and record[k] is not None:
            return record[k]
    raise DataError(
        f"record {index} has no {what}", field="|".join(keys), source=source,
        hint=f"each record needs one of {', '.join(keys)}",
    )


def load_problems(source: str, limit: int | None = None) -> list[Problem]:
    """Load problems by name (`gsm8k:test`) or path/URI. Raises DataError naming the field on bad input."""
    return problems_from_table(load_problem_table(source, limit), str(source))


def problems_from_table(table, source: str) -> list[Problem]:
    """`Problem` objects for the rows of a `load_problem_table` table (or a filtered slice of it)."""
    cols = [table.column(k).to_pylist() for k in ("problem_id", "problem", "gold_answer", "index")]
    return [Problem(pid, text, gold, source, i) for pid, text, gold, i in zip(*cols)]


def load_problem_table(source: str, limit: int | None = None):
    """The problems of SOURCE as a pyarrow table (`problem_id`, `problem`, `gold_answer`, `index`), validated as
    `load_problems` does. JSON Lines and Parquet are read column-wise by pyarrow (a million problems in seconds,
    without a Python object per record); a file pyarrow cannot read that way (a JSON list, mixed value types, a
    JSON error) goes through the record-by-record reader, whose errors name the line and field."""
    import pyarrow as pa

    name = str(source)
    location = str(NAMED_SOURCES[name]) if name in NAMED_SOURCES else name
    if ":" in name and name not in NAMED_SOURCES and "://" not in name and not Path(name).exists():
        raise DataError(f"unknown dataset name; known: {', '.join(NAMED_SOURCES)}", source=name)
    cols = None
    if location.endswith(".parquet"):
        import pyarrow.parquet as pq

        raw = pq.read_table(io.BytesIO(storage.read_bytes(location)))
        cols = _columns_from_table(raw, name, limit)
        if cols is None:
            cols = _columns_from_records(raw.to_pylist(), name, limit)
    else:
        head = storage.read_bytes(location, 1 << 16)
        if not head.strip() and not storage.read_bytes(location).strip():
            raise DataError("file is empty", source=name)
        if not head.lstrip().startswith(b"["):
            try:
                cols = _columns_from_table(_read_json_lines(location), name, limit)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):  # not a Ctrl-C
                cols = None  # the record-by-record reader names the line (or reads mixed types)
        if cols is None:
            cols = _columns_from_records(parse_json_records(storage.read_bytes(location), name), name, limit)
    texts, golds = cols
    if len(texts) == 0:
        raise DataError("contains no problems", source=name)
    ids = pa.chunked_array([pa.array([problem_id(t) for t in texts.slice(lo, 65536).to_pylist()], pa.string())
                            for lo in range(0, len(texts), 65536)], pa.string())  # no list of a million at once
    return pa.table({"problem_id": ids, "problem": texts, "gold_answer": golds,
                     "index": pa.array(range(len(texts)), pa.int64())})


def _read_json_lines(location: str):
    """A JSON Lines file as a pyarrow table, streamed in blocks (peak memory about twice the table)."""
    import pyarrow as pa
    import pyarrow.json as pj

    fs, path = storage.resolve(location)
    with fs.open_input_stream(path) as f:
        reader = pj.open_json(f, read_options=pj.ReadOptions(block_size=1 << 20, use_threads=False))
        return pa.Table.from_batches(list(reader), schema=reader.schema)


def _columns_from_records(records: list[dict], name: str, limit: int | None):
    import pyarrow as pa

    texts, golds = [], []
    for i, r in enumerate(records):
        if limit is not None and len(texts) >= limit:
            break
        text = _first_key(r, PROBLEM_KEYS, "problem text", name, i)
        gold = _first_key(r, GOLD_KEYS, "gold answer", name, i)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"record {i} has an empty problem text", field="question", source=name)
        texts.append(text)
        golds.append(gold if isinstance(gold, str) else _number_text(gold))
    return pa.array(texts, pa.string()), pa.array(golds, pa.string())


def _columns_from_table(table, name: str, limit: int | None):
    """(problem texts, gold texts) as arrays, the same values and errors as `_columns_from_records`; None when a
    column's type needs the record-by-record reader."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if limit is not None:
        table = table.slice(0, limit)

    def first_present(keys, what, numbers):
        arrays = []
        for k in keys:
            if k not in table.column_names:
                continue
            col = table.column(k)
            if pa.types.is_null(col.type):
                continue
            if numbers and (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
                col = pa.array([None if v is None else _number_text(v) for v in col.to_pylist()], pa.string())
            elif not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
                return None
            arrays.append(col.cast(pa.string()))
        if not arrays:
            raise DataError(f"record 0 has no {what}", field="|".join(keys), source=name,
                            hint=f"each record needs one of {', '.join(keys)}")
        out = pc.coalesce(*arrays) if len(arrays) > 1 else arrays[0]
        missing = pc.indices_nonzero(pc.is_null(out))
        if len(missing):
            i = missing[0].as_py()
            raise DataError(f"record {i} has no {what}", field="|".join(keys), source=name,
                            hint=f"each record needs one of {', '.join(keys)}")
        return out

    texts = first_present(PROBLEM_KEYS, "problem text", numbers=False)
    golds = first_present(GOLD_KEYS, "gold answer", numbers=True)
    if texts is None or golds is None:
        return None
    empty = pc.indices_nonzero(pc.or_(pc.equal(pc.binary_length(texts), 0), pc.utf8_is_space(texts)))
    if len(empty):
        raise DataError(f"record {empty[0].as_py()} has an empty problem text", field="question", source=name)
    return texts, golds


def _number_text(x) -> str:
    """A released float gold (18.0) as GSM8K's gold text ('#### 18')."""
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    return f"#### {x}"
