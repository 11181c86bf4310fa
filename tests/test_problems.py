import json

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
