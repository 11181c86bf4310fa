"""Crash-safe output files of a generation run (no Ray): torn temps left by a kill in parts/ and failures/ never
break a resume, temps are swept, readers read only finished `*.parquet` files; the run manifest (drift refused,
fields named) and the lease lock (a second job on the same output refuses)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa
import pytest

from subq import storage
from subq.problems import load_problems
from subq.schema import SubQRow, SubQuestionSet, write_parquet


def _row(p) -> SubQRow:
    s = SubQuestionSet.from_texts("Q1: How many?", "A1: 2\n\nFinal answer: 2", "#### 2", ["Q1: Yes"])
    return SubQRow(problem_id=p.problem_id, problem=p.problem, gold_answer="#### 2", true_answer=2.0, sets=[s],
                   source=p.source, source_index=p.index, teacher_model="gpt-3.5-turbo", template_id="paper",
                   prompt_tokens=1, completion_tokens=1, cost_usd=0.0, attempts=1, error=None)


def _failure(p) -> dict:
    return dict(problem_id=p.problem_id, problem=p.problem, source=p.source, source_index=p.index, stage="qg",
                error_type="TeacherUnavailableError", reason="HTTP 503", attempts=1, time=time.time())


def test_torn_temps_in_parts_and_failures_do_not_break_resume(tmp_path):
    from pipelines.generate.output import FAILURE_SCHEMA, _write_table, done_ids, read_failures

    probs = load_problems("gsm8k:test", 4)
    out = tmp_path / "out"
    write_parquet([_row(probs[0]), _row(probs[1])], str(out / "parts" / "part-a.parquet"))
    _write_table(pa.Table.from_pylist([_failure(probs[2])], schema=FAILURE_SCHEMA), str(out / "failures" / "part-b.parquet"))
    # what a kill between "write the temp" and "rename" left behind with the old naming, half written
    (out / "parts" / "part-c.parquet.tmp").write_bytes(b"PAR1\x00\x01torn")
    (out / "failures" / "part-d.parquet.tmp").write_bytes(b"PAR1")
    done = done_ids(str(out))
    rows, fails = done.to_pylist(), read_failures(str(out), done)
    assert set(rows) == {probs[0].problem_id, probs[1].problem_id} and set(fails) == {probs[2].problem_id}


def test_a_kill_between_write_and_rename_leaves_a_temp_readers_skip_and_the_sweep_removes(tmp_path, monkeypatch):
    from pipelines.generate.output import done_ids

    probs = load_problems("gsm8k:test", 3)
    out = tmp_path / "out"
    write_parquet([_row(probs[0])], str(out / "parts" / "part-a.parquet"))

    def killed(*a, **k):
        raise SystemExit("killed between write and rename")

    monkeypatch.setattr(os, "replace", killed)
    monkeypatch.setattr(os, "rename", killed)
    with pytest.raises(SystemExit):
        write_parquet([_row(probs[1])], str(out / "parts" / "part-b.parquet"))
    monkeypatch.undo()
    left = [p.name for p in (out / "parts").iterdir()]
    assert len(left) == 2 and any(n != "part-a.parquet" for n in left)
    temp = next(n for n in left if n != "part-a.parquet")
    assert temp.startswith(("_", ".")), temp  # a name pyarrow's dataset discovery and our readers skip
    rows = done_ids(str(out)).to_pylist()
    assert set(rows) == {probs[0].problem_id}
    assert storage.list_files(str(out / "parts"), ".parquet") == [str(out / "parts" / "part-a.parquet")]
    assert storage.sweep_temps(str(out)) == 1 and sorted(p.name for p in (out / "parts").iterdir()) == ["part-a.parquet"]


def test_streamed_export_matches_the_whole_list_export_byte_for_byte(tmp_path):
    """Exports of a large output are written chunk by chunk (bounded memory); the files are the same."""
    from subq.schema import iter_parquet_sorted, read_parquet, sort_rows, write_paper, write_paper_chunks

    ps = load_problems("gsm8k:test", 7)
    write_parquet([_row(p) for p in ps[4:]], str(tmp_path / "parts" / "part-a.parquet"))
    write_parquet([_row(p) for p in ps[:4]], str(tmp_path / "parts" / "part-b.parquet"))
    rows = sort_rows(read_parquet(str(tmp_path / "parts")))
    for fmt in ("paper_raw", "paper_dataset"):
        write_paper(rows, str(tmp_path / f"whole.{fmt}"), fmt)
        assert write_paper_chunks(iter_parquet_sorted(str(tmp_path / "parts"), chunk_rows=3),
                                  str(tmp_path / f"chunks.{fmt}"), fmt) == 7
        assert (tmp_path / f"whole.{fmt}").read_bytes() == (tmp_path / f"chunks.{fmt}").read_bytes()
    # export writes both files in one pass over the parts: the same bytes
    both = {fmt: str(tmp_path / f"one-pass.{fmt}") for fmt in ("paper_raw", "paper_dataset")}
    assert write_paper_chunks(iter_parquet_sorted(str(tmp_path / "parts"), chunk_rows=2), both) == 7
    for fmt, loc in both.items():
        assert (tmp_path / f"whole.{fmt}").read_bytes() == Path(loc).read_bytes()
    # parts whose rows interleave in source order (every chunk draws from both): the same order
    write_parquet([_row(p) for p in ps[0::2]], str(tmp_path / "mixed" / "part-c.parquet"))
    write_parquet([_row(p) for p in ps[1::2]], str(tmp_path / "mixed" / "part-d.parquet"))
    chunks = list(iter_parquet_sorted(str(tmp_path / "mixed"), chunk_rows=3))
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert [r.problem_id for c in chunks for r in c] == [r.problem_id for r in rows]


def test_resume_builds_objects_only_for_the_pending_problems(tmp_path, monkeypatch):
    """Resume at scale (issue 11, defect 9): the input and the finished ids stay in Arrow columns; a Python object
    is built only for each problem still to do (a million finished problems no longer mean a million objects)."""
    import subq.problems as P
    from pipelines.generate import run_generate

    ps = load_problems("gsm8k:train", 3000)
    write_parquet([_row(p) for p in ps[:2990]], str(tmp_path / "out" / "parts" / "part-a.parquet"))
    built = []

    class Counting(P.Problem):
        def __init__(self, *a, **k):
            built.append(a[0] if a else k["problem_id"])
            super().__init__(*a, **k)

    monkeypatch.setattr(P, "Problem", Counting)
    s = run_generate({"input": "gsm8k:train", "limit": 3000, "output": str(tmp_path / "out"), "dry_run": True})
    assert s["already_done"] == 2990
    assert sorted(built) == sorted(p.problem_id for p in ps[2990:])
