"""`subq generate` end to end (CleanRL style: the real command, a tiny budget) against the real local teacher
server: 50 problems over 2 teacher actors; injected faults; the
failures table and --retry-failed; the budget cap; bad input and a bad key. (SIGKILL and resume: test_generate_robust.)"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import subq_generate

from subq.problems import load_problems
from subq.schema import ROW_SCHEMA, detect_format, read_parquet, read_rows, validate_table

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("cli_ray")]  # one Ray head for the module's jobs

RAW = Path(__file__).resolve().parents[3] / "subq/data/gsm8k-ai-subq/qg_test_data_raw.jsonl"


gen = subq_generate


def part_ids(out: Path) -> list[str]:
    return [r.problem_id for r in read_parquet(str(out / "parts"))]


def cache_keys(out: Path) -> set[str]:
    return {p.stem for p in (out / "cache").rglob("*.json")}


def test_50_problems_two_actors_rows_schema_rewards_exports(tmp_path, subq_bin):
    from pipelines.teacher_server import TeacherServer

    out = tmp_path / "out"
    with TeacherServer(latency_s=0.05) as ts:
        s = gen(subq_bin, "--input", "gsm8k:test", "--limit", "50", "--output", str(out), "--base-url", ts.base_url,
                "--actors", "2,2", "--batch-size", "5")
        st = ts.stats()
        assert s["rows_total"] == 50 and s["failures_open"] == 0 and s["not_done"] == 0
        assert s["this_run"]["actors_used"] == 2 and s["this_run"]["calls"] == 50 * 15
        assert st["completed"] == 750 and st["duplicates"] == 0
        assert st["max_in_flight"] >= 8  # many calls in flight per actor (asyncio), not one at a time
        # a re-run of the same command sends nothing
        again = gen(subq_bin, "--input", "gsm8k:test", "--limit", "50", "--output", str(out), "--base-url",
                    ts.base_url, "--actors", "2,2")
        assert again["pending_at_start"] == 0 and again["rows_total"] == 50 and ts.stats()["total"] == st["total"]
    ids = part_ids(out)
    want = [p.problem_id for p in load_problems("gsm8k:test", 50)]
    assert len(ids) == 50 and set(ids) == set(want)
    for f in (out / "parts").glob("*.parquet"):
        t = pq.read_table(f)
        assert t.schema.equals(ROW_SCHEMA, check_metadata=False) and validate_table(t).num_rows == t.num_rows
    rows = read_parquet(str(out / "parts"))
    released = [json.loads(x) for x in RAW.read_text().splitlines()[:50]]
    by_problem = {r["problem"]: r for r in released}
    for r in rows:
        assert len(r.sets) == 3 and r.error is None and r.cost_usd > 0 and r.teacher_model == "gpt-3.5-turbo"
        for s_ in r.sets:
            assert s_.answer_correctness in (0.0, 1.0) and len(s_.feedback_texts) == 3
            assert len(s_.usefulness) == len(s_.questions) > 0
        # set 0 is the released ChatGPT sub-question set, replayed by the teacher server
        assert r.sets[0].questions_text == by_problem[r.problem]["questions"][0]
    assert sum(s_.answer_correctness for r in rows for s_ in r.sets) / 150 > 0.5
    assert detect_format(str(out / "paper_raw.jsonl")) == "paper_raw"
    assert detect_format(str(out / "paper_dataset.json")) == "paper_dataset"
    raw_rows = read_rows(str(out / "paper_raw.jsonl"))
    assert [r.problem_id for r in raw_rows] == want  # source order
    assert len(json.loads((out / "paper_dataset.json").read_text())) == 150
    assert len(read_rows(str(out / "paper_dataset.json"))) == 50
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_total"] == 50 and (out / "failures.jsonl").read_text() == ""


def test_faults_every_problem_ends_as_row_or_recorded_failure(tmp_path, subq_bin):
    from pipelines.teacher_server import TeacherServer

    out = tmp_path / "out"
    with TeacherServer(rpm=600, fail_rate=0.05, malformed_rate=0.02, timeout_rate=0.01, timeout_hang_s=3,
                       seed=7) as ts:
        # the client's limit is above the server's: the server answers 429s and subq must back off
        s = gen(subq_bin, "--input", "gsm8k:test", "--limit", "16", "--output", str(out), "--base-url", ts.base_url,
                "--actors", "2,2", "--rpm", "1500", "--n-sets", "2", "--n-feedback", "2", "--max-retries", "4",
                "--timeout-s", "1", "--batch-size", "4")
        st = ts.stats()
    assert st["by_status"].get("429", 0) > 0 and s["this_run"]["n_429"] > 0
    assert st["by_status"].get("500", 0) + st["by_status"].get("503", 0) > 0 and st["malformed"] > 0
    failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    ids = part_ids(out)
    assert len(ids) == len(set(ids))
    assert set(ids) | {f["problem_id"] for f in failures} == {p.problem_id for p in load_problems("gsm8k:test", 16)}
    assert s["rows_total"] + s["failures_open"] == 16 and s["not_done"] == 0
    assert all(f["reason"] and f["stage"] for f in failures)


def test_failures_table_and_retry_failed_retries_only_those(tmp_path, subq_bin):
    from pipelines.teacher_server import TeacherServer, free_port

    out = tmp_path / "out"
    port = free_port()  # one endpoint, first broken, then repaired (another endpoint would be settings drift)
    common = ["--input", "gsm8k:test", "--output", str(out), "--n-sets", "1", "--n-feedback", "1", "--actors", "1,1"]
    with TeacherServer(fail_rate=1.0, port=port) as broken:
        r = gen(subq_bin, *common, "--limit", "3", "--base-url", broken.base_url, "--max-retries", "1", check=False)
    # every problem failed: exit 2, the cause and where the reasons are on one line; the failures are recorded
    errs = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and len(errs) == 1 and "HTTP 50" in errs[0] and "failures.jsonl" in errs[0], r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["rows_total"] == 0 and s["failures_open"] == 3
    failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert all("HTTP 50" in f["reason"] and f["stage"] == "qg" for f in failures)
    with TeacherServer(port=port) as ok:
        # plain re-run: recorded failures are not retried silently
        s = gen(subq_bin, *common, "--limit", "3", "--base-url", ok.base_url)
        assert s["pending_at_start"] == 0 and ok.stats()["total"] == 0
        # --retry-failed with a larger --limit: only the 3 failures are processed, not the 2 new problems
        s = gen(subq_bin, *common, "--limit", "5", "--base-url", ok.base_url, "--retry-failed")
        assert s["pending_at_start"] == 3 and s["rows_total"] == 3 and s["failures_open"] == 0
        assert ok.stats()["completed"] == 3 * 3
    assert (out / "failures.jsonl").read_text() == ""


def test_budget_cap_stops_cleanly_keeping_finished_rows(tmp_path, subq_bin):
    from pipelines.teacher_server import TeacherServer

    out = tmp_path / "out"
    with TeacherServer(latency_s=0.02) as ts:
        s = gen(subq_bin, "--input", "gsm8k:test", "--limit", "12", "--output", str(out), "--base-url", ts.base_url,
                "--actors", "1,1", "--batch-size", "2", "--max-concurrency", "4", "--max-cost-usd", "0.03")
        st = ts.stats()
    assert s["stopped"] == "budget" and s["this_run"]["skipped_budget"] > 0
    assert s["this_run"]["cost_usd"] <= 0.03 and s["limiter"]["budget"]["spent_usd"] <= 0.03
    assert 0 < s["rows_total"] < 12 and s["failures_open"] == 0 and st["duplicates"] == 0
    assert len(part_ids(out)) == s["rows_total"]


def test_bad_input_is_one_clear_line_and_nothing_is_damaged(tmp_path, subq_bin):
    from pipelines.teacher_server import TeacherServer

    out = tmp_path / "out"
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"q": "What is 1+1?", "answer": "#### 2"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (["--input", str(nofield)], "question|problem"),
        (["--input", str(empty)], "empty"),
        (["--input", str(tmp_path / "missing.jsonl")], "not found"),
        (["--actors", "3,1"], "actors"),
        (["--n-sets", "0"], "n_sets"),
        (["--model", "no-such-model"], "model"),
    ]
    for args, needle in cases:
        r = gen(subq_bin, "--output", str(out), *args, "--limit", "2", check=False)
        lines = [x for x in r.stderr.strip().splitlines() if x.strip() and not x.startswith("logs: ")]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (args, r.stderr)
        assert not out.exists()
    r = gen(subq_bin, "--output", str(out), "--limit", "2", "--dry-run", check=False, key="")
    assert r.returncode == 0 and json.loads(r.stdout)["calls"] == 30 and not out.exists()

    secret = "sk-DO-NOT-LEAK-0123456789"
    with TeacherServer(api_key="good-key") as ts:
        common = ["--input", "gsm8k:test", "--output", str(out), "--base-url", ts.base_url, "--n-sets", "1",
                  "--n-feedback", "1", "--actors", "1,1"]
        gen(subq_bin, *common, "--limit", "2", key="good-key")
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "summary.json"}
        r = gen(subq_bin, *common, "--limit", "6", key=secret, check=False)
        assert r.returncode == 2 and secret not in r.stderr + r.stdout and "DO-NOT-LEAK" not in r.stderr
        err = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert len(err) == 1 and "401" in err[0] and ts.base_url in err[0]
        assert ts.stats()["by_status"].get("401", 0) <= 4  # stopped at once, not retried
    for p, data in before.items():
        if p.name != "config.yaml":
            assert p.read_bytes() == data, p
    assert not any(secret in p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())
    r = gen(subq_bin, "--output", str(out), "--limit", "2", key="", check=False)
    assert r.returncode == 2 and "OPENAI_API_KEY" in r.stderr
