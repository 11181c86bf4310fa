import json

import pyarrow as pa
import pytest

from subq.errors import DataError
from subq.schema import (
    ROW_SCHEMA, SubQuestionSet, dumps_paper, read_parquet, read_rows, rows_to_table, table_to_rows,
    validate_table, write_paper, write_parquet,
)
from tests.conftest import CHAT_TEST, DATASET_TEST, RAW_TEST


@pytest.fixture(scope="module")
def raw_rows():
    return read_rows(str(RAW_TEST))


def test_raw_jsonl_round_trip_is_byte_identical(raw_rows):
    assert len(raw_rows) == 1319
    assert dumps_paper(raw_rows, "paper_raw").encode() == RAW_TEST.read_bytes()


def test_chat_round_trip_is_byte_identical():
    rows = read_rows(str(CHAT_TEST))
    assert dumps_paper(rows, "paper_chat").encode() == CHAT_TEST.read_bytes()


def test_dataset_round_trip_is_byte_identical():
    rows = read_rows(str(DATASET_TEST))
    assert dumps_paper(rows, "paper_dataset").encode() == DATASET_TEST.read_bytes()


def test_raw_to_training_dataset_reproduces_release(raw_rows):
    """Our rewards + export, from the raw teacher replies, give the released training file exactly."""
    assert dumps_paper(raw_rows, "paper_dataset").encode() == DATASET_TEST.read_bytes()


def test_parquet_round_trip(tmp_path, raw_rows):
    path = str(tmp_path / "rows.parquet")
    write_parquet(raw_rows, path)
    back = read_parquet(path)
    assert [r.to_dict() for r in back] == [r.to_dict() for r in raw_rows]
    assert dumps_paper(back, "paper_raw").encode() == RAW_TEST.read_bytes()
    # a directory of parts reads as one table, in source order
    parts = tmp_path / "parts"
    parts.mkdir()
    write_parquet(raw_rows[700:], str(parts / "part-1.parquet"))
    write_parquet(raw_rows[:700], str(parts / "part-0.parquet"))
    assert [r.problem_id for r in read_rows(str(parts))] == [r.problem_id for r in raw_rows]


def test_feedback_round_trip_and_rewards(tmp_path):
    s = SubQuestionSet.from_texts("Q1: a?\nQ2: b?", "A1: 1\nA2: 2\n\nFinal answer: 2", "#### 2",
                                  ["Q1: Yes\nQ2: No", "Q1: Yes\nQ2: Yes", "Q1: No\nQ2: No"])
    assert s.questions == ["a?", "b?"] and s.answer_correctness == 1.0
    assert s.usefulness == [2 / 3, 1 / 3]
    from subq.schema import SubQRow

    row = SubQRow("p1", "problem?", "#### 2", 2.0, [s], source="x", source_index=0)
    f = tmp_path / "raw.jsonl"
    write_paper([row], str(f), "paper_raw")
    obj = json.loads(f.read_text())
    assert obj["feedback"] == [s.feedback_texts]
    back = read_rows(str(f))[0]
    assert back.sets[0].usefulness == s.usefulness
    assert back.sets[0].feedback_texts == s.feedback_texts


def test_uri_filesystem(tmp_path, raw_rows):
    uri = f"file://{tmp_path}/out/rows.parquet"
    write_parquet(raw_rows[:5], uri)
    assert [r.problem for r in read_rows(uri)] == [r.problem for r in raw_rows[:5]]


def test_validate_table_names_missing_column():
    t = pa.table({"problem_id": ["a"], "problem": ["b"]})
    with pytest.raises(DataError, match="field 'sets'"):
        validate_table(t, "x.parquet")


def test_table_schema(raw_rows):
    t = rows_to_table(raw_rows[:3])
    assert t.schema.equals(ROW_SCHEMA, check_metadata=False)
    assert table_to_rows(t)[0].problem == raw_rows[0].problem


def test_bad_raw_record_names_field(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"problem": "p", "answers": [], "answer": "#### 1"}) + "\n")
    with pytest.raises(DataError, match="field 'questions'"):
        read_rows(str(f))
    f.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_rows(str(f))
