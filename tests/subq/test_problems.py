import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from subq.errors import DataError
from subq.problems import load_problems, problem_id


def test_named_sources():
    train = load_problems("gsm8k:train")
    test = load_problems("gsm8k:test")
    assert len(train) == 7473 and len(test) == 1319
    assert len({p.problem_id for p in train}) == 7473
    assert test[0].gold_answer.endswith("#### 18")
    assert test[0].is_few_shot_example and not test[3].is_few_shot_example
    released = load_problems("gsm8k-ai-subq:test")
    assert [p.problem_id for p in released] == [p.problem_id for p in test]  # same problems, same ids
    assert len(load_problems("gsm8k:test", limit=5)) == 5


def test_ids_are_stable_content_hashes():
    assert problem_id("  What is 2+2? ") == problem_id("What is 2+2?")
    assert problem_id("What is 2+2?") == "p" + __import__("hashlib").sha256(b"What is 2+2?").hexdigest()[:16]


def test_paths_jsonl_json_parquet_uri(tmp_path):
    recs = [{"question": "a?", "answer": "#### 1"}, {"problem": "b?", "true_answer": 2.0}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "p.json").write_text(json.dumps(recs))
    pq.write_table(pa.Table.from_pylist([{"question": "a?", "answer": "#### 1"}]), tmp_path / "p.parquet")
    for name in ("p.jsonl", "p.json"):
        ps = load_problems(str(tmp_path / name))
        assert [p.problem for p in ps] == ["a?", "b?"] and ps[1].gold_answer == "#### 2"
    assert load_problems(str(tmp_path / "p.parquet"))[0].gold_answer == "#### 1"
    assert len(load_problems(f"file://{tmp_path}/p.jsonl")) == 2


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="unknown dataset name"):
        load_problems("gsm8k:validation")
    with pytest.raises(DataError, match="file not found"):
        load_problems(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_problems(str(tmp_path / "empty.jsonl"))
    (tmp_path / "noq.jsonl").write_text(json.dumps({"answer": "#### 1"}) + "\n")
    with pytest.raises(DataError, match="field 'question|problem'"):
        load_problems(str(tmp_path / "noq.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"question": "a?", "answer": "#### 1"}\n{oops\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_problems(str(tmp_path / "bad.jsonl"))


def test_column_reader_matches_the_record_reader(tmp_path):
    """JSON Lines and Parquet are read column-wise (issue 11: a million problems at resume); every value and
    error is the record-by-record reader's."""
    from subq.problems import _columns_from_records, load_problem_table, parse_json_records

    def by_records(path, limit=None):
        texts, golds = _columns_from_records(parse_json_records(path.read_bytes(), str(path)), str(path), limit)
        return texts.to_pylist(), golds.to_pylist()

    recs = [{"question": "a?", "answer": "#### 1"}, {"problem": " b? ", "true_answer": 2.0},
            {"question": None, "problem": "c?", "gold_answer": 3}, {"question": "d?", "true_answer": 2.5,
                                                                     "extra": {"nested": [1]}}]
    f = tmp_path / "mixed.jsonl"
    f.write_text("".join(json.dumps(r) + "\n\n" for r in recs))  # blank lines are not records
    t = load_problem_table(str(f))
    assert (t.column("problem").to_pylist(), t.column("gold_answer").to_pylist()) == by_records(f)
    assert t.column("gold_answer").to_pylist() == ["#### 1", "#### 2", "#### 3", "#### 2.5"]
    assert t.column("problem_id").to_pylist() == [problem_id(x) for x in ("a?", "b?", "c?", "d?")]
    assert t.column("index").to_pylist() == [0, 1, 2, 3]
    assert load_problem_table(str(f), limit=2).num_rows == 2
    real = Path(__file__).resolve().parents[2] / "subq" / "data" / "gsm8k" / "test.jsonl"
    t = load_problem_table(str(real))
    assert (t.column("problem").to_pylist(), t.column("gold_answer").to_pylist()) == by_records(real)
    pq.write_table(pa.table({"question": ["a?", "b?"], "true_answer": [1.0, 2.0]}), tmp_path / "p.parquet")
    assert load_problem_table(str(tmp_path / "p.parquet")).column("gold_answer").to_pylist() == ["#### 1", "#### 2"]
    # errors name the record and field, as before
    (tmp_path / "gap.jsonl").write_text(json.dumps({"question": "a?", "answer": "1"}) + "\n"
                                        + json.dumps({"answer": "#### 2"}) + "\n")
    with pytest.raises(DataError, match="record 1 has no problem text"):
        load_problem_table(str(tmp_path / "gap.jsonl"))
    (tmp_path / "blank.jsonl").write_text(json.dumps({"question": " \u00a0", "answer": "1"}) + "\n")
    with pytest.raises(DataError, match="record 0 has an empty problem text"):
        load_problem_table(str(tmp_path / "blank.jsonl"))
    (tmp_path / "nogold.jsonl").write_text(json.dumps({"question": "a?"}) + "\n")
    with pytest.raises(DataError, match="record 0 has no gold answer"):
        load_problem_table(str(tmp_path / "nogold.jsonl"))
