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


def read_records(location: str) -> list[dict]:
    """Read JSON objects from a .jsonl / .json list / .parquet file (local path or URI)."""
    location = str(location)
    if location.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(storage.read_bytes(location)))
        return table.to_pylist()
    return parse_json_records(storage.read_bytes(location), location)


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
    name = str(source)
    location = str(NAMED_SOURCES[name]) if name in NAMED_SOURCES else name
    if ":" in name and name not in NAMED_SOURCES and "://" not in name and not Path(name).exists():
        raise DataError(f"unknown dataset name; known: {', '.join(NAMED_SOURCES)}", source=name)
    records = read_records(location)
    problems = []
    for i, r in enumerate(records):
        text = _first_key(r, PROBLEM_KEYS, "problem text", name, i)
        gold = _first_key(r, GOLD_KEYS, "gold answer", name, i)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"record {i} has an empty problem text", field="question", source=name)
        gold = gold if isinstance(gold, str) else _number_text(gold)
        problems.append(Problem(problem_id(text), text, gold, name, i))
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise DataError("contains no problems", source=name)
    return problems


def _number_text(x) -> str:
    """A released float gold (18.0) as GSM8K's gold text ('#### 18')."""
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    return f"#### {x}"
