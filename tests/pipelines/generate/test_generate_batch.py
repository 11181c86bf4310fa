"""`subq generate --api batch` against the teacher server's Batch API, with the real `openai` client: the server's
/v1/files and /v1/batches; batch rows = online rows; splitting; expiry resubmits only what is missing; SIGKILL of
the driver then a re-run submits nothing twice; per-request errors and a bad output file; Ctrl-C and --cancel;
an endpoint without Batch support."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pyarrow.parquet as pq
import pytest

from subq.schema import ROW_SCHEMA, read_parquet


def bstats(ts) -> dict:
    return httpx.get(ts.base_url + "/stats/batches", timeout=30).json()


def gen(subq_bin, *args, check=True, timeout=300):
    env = {**os.environ, "OPENAI_API_KEY": "unused"}
    r = subprocess.run([subq_bin, "generate", "--api", "batch", "--batch-poll-s", "0.2", "--progress-interval-s", "1",
                        *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])
    return r


def state(out: Path) -> dict:
    return json.loads((out / "batch" / "state.json").read_text())


def line(cid: str, content: str) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": content}], "max_tokens": 64}}


def wait_done(client, bid: str, timeout: float = 60):
    deadline = time.time() + timeout
    b = client.batches.retrieve(bid)
    while b.status not in ("completed", "failed", "expired", "cancelled") and time.time() < deadline:
        time.sleep(0.1)
        b = client.batches.retrieve(bid)
    return b


# ------------------------------------------------------------------ the server's Batch API (real openai client)


def test_server_batch_api_files_batches_errors_expiry_cancel_with_openai_client():
    from pipelines.teacher_server import TeacherServer

    with TeacherServer(batch_delay_s=0.3, batch_error_rate=0.25, batch_expire_first=1,
                       batch_upload_fail_first=1) as ts:
        c = openai.OpenAI(base_url=ts.base_url, api_key="unused", max_retries=3)
        data = "".join(json.dumps(line(f"p{i}|qg|0|{i % 3}", f"question {i}")) + "\n" for i in range(20)).encode()
        f = c.files.create(file=("req.jsonl", data), purpose="batch")  # the first upload answers 500: SDK retries
        assert f.purpose == "batch" and f.bytes == len(data) and c.files.content(f.id).content == data
        expired = wait_done(c, c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                completion_window="24h", metadata={"k": "v"}).id)
        assert expired.status == "expired" and expired.metadata == {"k": "v"}
        out = [json.loads(x) for x in c.files.content(expired.output_file_id).text.splitlines()]
        err = [json.loads(x) for x in c.files.content(expired.error_file_id).text.splitlines()]
        not_run = [e for e in err if (e["error"] or {}).get("code") == "batch_expired"]
        assert len(not_run) == 10 and len(out) + len(err) == 20  # half ran; the rest is marked, not lost
        done = wait_done(c, c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                             completion_window="24h").id)
        assert done.status == "completed" and done.request_counts.total == 20
        out = [json.loads(x) for x in c.files.content(done.output_file_id).text.splitlines()]
        err = [json.loads(x) for x in c.files.content(done.error_file_id).text.splitlines()]
        assert len(out) + len(err) == 20 and 0 < len(err) < 20  # per-request 500s in the error file
        assert all(e["response"]["status_code"] == 500 for e in err)
        assert out[0]["response"]["body"]["choices"][0]["message"]["content"]
        slow = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert c.batches.cancel(slow.id).status in ("cancelling", "cancelled")
        assert wait_done(c, slow.id).status == "cancelled"
        page = c.batches.list(limit=2)
        assert [b.id for b in page.data] == [slow.id, done.id] and page.has_more  # newest first
        assert [b.id for b in c.batches.list(limit=2)] == [slow.id, done.id, expired.id]  # the SDK pages on
        with pytest.raises(openai.BadRequestError):
            c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
        s = bstats(ts)
        assert s["upload_failures"] == 1 and s["uploads"] == 2 and s["batches_created"] == 3
    with TeacherServer(batch_api=False) as ts:
        c = openai.OpenAI(base_url=ts.base_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            c.batches.list()


# ------------------------------------------------------------------ generate --api batch end to end


@pytest.mark.slow
@pytest.mark.usefixtures("cli_ray")  # one Ray head for the module's jobs
def test_batch_rows_match_online_split_across_files_and_summary(tmp_path, subq_bin):
    from pipelines.teacher_server import TeacherServer

    on, ba = tmp_path / "online", tmp_path / "batch"
    common = ["--input", "gsm8k:test", "--limit", "30"]
    env = {**os.environ, "OPENAI_API_KEY": "unused"}
    dry = subprocess.run([subq_bin, "generate", *common, "--output", str(ba), "--api", "batch", "--dry-run"],
                         capture_output=True, text=True, env=env)
    est = json.loads(dry.stdout.strip().splitlines()[-1])
    assert est["cost_usd_typical_batch"] == pytest.approx(est["cost_usd_typical"] * 0.5, rel=1e-3)
    assert not ba.exists()  # a dry run writes nothing
    with TeacherServer(batch_delay_s=0.3) as ts:
        r = subprocess.run([subq_bin, "generate", *common, "--output", str(on), "--base-url", ts.base_url,
                            "--actors", "1,1", "--ray-num-cpus", "2"], capture_output=True, text=True, env=env,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        online = json.loads(r.stdout.strip().splitlines()[-1])
        s = gen(subq_bin, *common, "--output", str(ba), "--base-url", ts.base_url, "--batch-max-requests", "50",
                "--batch-max-in-flight", "3")
        st = bstats(ts)
    assert s["rows_total"] == 30 and s["failures_open"] == 0 and s["api"] == "batch"
    shards = state(ba)["shards"]
    # 90 QG requests in files of <= 50, then 360 QA + feedback requests in files of <= 50
    assert sorted(v["requests"] for v in shards.values() if v["round"] == "qg") == [40, 50]
    assert len([v for v in shards.values() if v["round"] == "answers"]) == 8
    assert all(v["requests"] <= 50 for v in shards.values())
    assert set(s["batch"]["batch_ids"]) == {v["batch_id"] for v in shards.values()} == set(st["batches"])
    assert s["batch"]["requests_per_status"]["completed"] == 450 == len(st["submitted_by_custom_id"])
    assert st["submitted_twice"] == []
    assert s["batch"]["cost_usd_batch"] == pytest.approx(0.5 * s["batch"]["cost_usd_online_equivalent"], rel=1e-6)
    assert s["this_run"]["cost_usd"] == pytest.approx(s["batch"]["cost_usd_batch"], rel=1e-4)
    assert s["this_run"]["cost_usd"] <= 0.51 * online["this_run"]["cost_usd"]
    on_rows = {r.problem_id: r for r in read_parquet(str(on / "parts"))}
    ba_rows = {r.problem_id: r for r in read_parquet(str(ba / "parts"))}
    assert set(on_rows) == set(ba_rows) and len(ba_rows) == 30
    for f in (ba / "parts").glob("*.parquet"):
        assert pq.read_table(f).schema.equals(ROW_SCHEMA, check_metadata=False)
    for pid, r in ba_rows.items():  # the replay teacher is deterministic: the same texts and rewards
        o = on_rows[pid]
        assert [x.questions_text for x in r.sets] == [x.questions_text for x in o.sets]
        assert [x.answer_text for x in r.sets] == [x.answer_text for x in o.sets]
        assert [x.usefulness for x in r.sets] == [x.usefulness for x in o.sets]
        assert r.cost_usd == pytest.approx(0.5 * o.cost_usd, rel=1e-6)
    assert (ba / "paper_raw.jsonl").read_text() and (ba / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("cli_ray")  # one Ray head for the module's jobs
def test_expired_batch_resubmits_only_the_requests_without_a_result(tmp_path, subq_bin):
    from pipelines.teacher_server import TeacherServer

    out = tmp_path / "out"
    with TeacherServer(batch_delay_s=0.2, batch_expire_first=1) as ts:
        s = gen(subq_bin, "--input", "gsm8k:test", "--limit", "4", "--output", str(out), "--base-url", ts.base_url)
        st = bstats(ts)
    assert s["rows_total"] == 4 and s["failures_open"] == 0
    qg = [v for v in state(out)["shards"].values() if v["round"] == "qg"]
    assert [v["status"] for v in qg] == ["expired", "completed"]
    assert qg[0]["requests"] == 12 and qg[1]["requests"] == 6  # only the half that never ran is sent again
    assert st["submitted_twice"] == sorted(c for c in st["submitted_by_custom_id"] if "|qg|" in c
                                           and st["submitted_by_custom_id"][c] == 2)
    assert len(st["submitted_twice"]) == 6 and st["requests_answered"] == 12 + 4 * 12


@pytest.mark.slow
@pytest.mark.usefixtures("cli_ray")  # one Ray head for the module's jobs
def test_driver_sigkilled_while_batches_run_then_rerun_submits_nothing_twice(tmp_path, subq_bin):
    from pipelines.teacher_server import TeacherServer

    out = tmp_path / "out"
    args = ["generate", "--api", "batch", "--batch-poll-s", "0.2", "--input", "gsm8k:test", "--limit", "6",
            "--output", str(out), "--batch-max-requests", "8"]
    with TeacherServer(batch_delay_s=3.0) as ts:
        env = {**os.environ, "OPENAI_API_KEY": "unused"}
        proc = subprocess.Popen([subq_bin, *args, "--base-url", ts.base_url], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:  # kill once the answers round has batches running
            try:
                sh = state(out)["shards"].values()
            except (OSError, ValueError):
                sh = []
            if any(v["round"] == "answers" and v["batch_id"] for v in sh):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the driver finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        before = bstats(ts)
        assert before["batches_created"] >= 3 and any(v != "completed" for v in before["batches"].values())
        s = gen(subq_bin, "--input", "gsm8k:test", "--limit", "6", "--output", str(out), "--base-url", ts.base_url,
                "--batch-max-requests", "8")
        after = bstats(ts)
    assert s["rows_total"] == 6 and s["failures_open"] == 0
    assert after["submitted_twice"] == [] and len(after["submitted_by_custom_id"]) == 6 * 15
    assert after["batches_created"] == len(state(out)["shards"])  # every batch created once, none re-bought
    assert after["uploads"] == len(state(out)["shards"])


@pytest.mark.slow
@pytest.mark.usefixtures("cli_ray")  # one Ray head for the module's jobs
def test_per_request_errors_are_recorded_failures_and_a_bad_output_file_is_reported(tmp_path, subq_bin):
    from pipelines.teacher_server import TeacherServer

    out = tmp_path / "out"
    with TeacherServer(batch_delay_s=0.2, batch_error_rate=0.05, batch_bad_output_first=1, seed=3) as ts:
        s = gen(subq_bin, "--input", "gsm8k:test", "--limit", "8", "--output", str(out), "--base-url", ts.base_url)
        st = bstats(ts)
        port = ts.config.port
    assert st["request_errors"] > 0
    assert s["rows_total"] + s["failures_open"] == 8 and s["failures_open"] > 0 and s["not_done"] == 0
    fails = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert all(f["error_type"] == "BatchRequestError" and "batch_" in f["reason"] and "HTTP 500" in f["reason"]
               for f in fails)
    first = next(iter(state(out)["shards"].values()))["batch_id"]
    assert any(first in e and "malformed" in e for e in s["batch"]["output_errors"])
    # every good line of the broken file was kept: nothing was sent again
    assert st["submitted_twice"] == []
    # a later ONLINE --retry-failed re-uses the batch replies (the same request cache) and sends only the rest
    with TeacherServer(port=port) as ts:  # the same endpoint, without the faults
        r = subprocess.run([subq_bin, "generate", "--input", "gsm8k:test", "--limit", "8", "--output", str(out),
                            "--base-url", ts.base_url, "--retry-failed", "--actors", "1,1", "--ray-num-cpus", "2"],
                           capture_output=True, text=True, env={**os.environ, "OPENAI_API_KEY": "unused"}, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        s2 = json.loads(r.stdout.strip().splitlines()[-1])
        sent = ts.stats(keys=False)["completed"]
    assert s2["rows_total"] == 8 and s2["failures_open"] == 0
    assert s2["this_run"]["calls"] == 15 * len(fails) and s2["this_run"]["cache_hits"] > 0
    assert sent == s2["this_run"]["calls"] - s2["this_run"]["cache_hits"] < 15 * len(fails)


@pytest.mark.slow
@pytest.mark.usefixtures("cli_ray")  # one Ray head for the module's jobs
def test_ctrl_c_leaves_batches_running_and_cancel_cancels_them(tmp_path, subq_bin):
    from pipelines.teacher_server import TeacherServer

    out = tmp_path / "out"
    args = ["--input", "gsm8k:test", "--limit", "3", "--output", str(out)]
    with TeacherServer(batch_delay_s=300.0) as ts:
        env = {**os.environ, "OPENAI_API_KEY": "unused"}
        proc = subprocess.Popen([subq_bin, "generate", "--api", "batch", "--batch-poll-s", "0.2", *args,
                                 "--base-url", ts.base_url], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline and not (out / "batch" / "state.json").exists() or \
                not any(v["batch_id"] for v in state(out)["shards"].values()):
            time.sleep(0.05)
        live = gen(subq_bin, *args, "--base-url", ts.base_url, "--cancel", check=False)
        assert live.returncode == 2 and "another job is writing this output" in live.stderr  # stop it first
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # Ctrl-C did not stop it: show where every thread is, then fail
            proc.send_signal(signal.SIGUSR1)
            time.sleep(3)
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"subq generate still running 60 s after SIGINT; its threads:\n{err[-6000:]}")
        assert proc.returncode == 130 and "--cancel" in err
        assert list(bstats(ts)["batches"].values()) == ["in_progress"]  # left running at the provider
        s = gen(subq_bin, *args, "--base-url", ts.base_url, "--cancel")
        assert len(s["cancelled"]) == 1 and bstats(ts)["cancel_calls"] == 1
        assert list(bstats(ts)["batches"].values()) == ["cancelled"]


@pytest.mark.slow
@pytest.mark.usefixtures("cli_ray")  # one Ray head for the module's jobs
def test_endpoint_without_batch_support_fails_before_any_upload(tmp_path, subq_bin):
    from pipelines.teacher_server import TeacherServer

    out = tmp_path / "out"
    with TeacherServer(batch_api=False) as ts:
        r = gen(subq_bin, "--input", "gsm8k:test", "--limit", "2", "--output", str(out), "--base-url", ts.base_url,
                check=False)
        assert ts.stats(keys=False)["total"] == 0
    assert r.returncode == 2
    assert "error:" in r.stderr and "no Batch API" in r.stderr and "api" in r.stderr
    assert not (out / "batch").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("cli_ray")  # one Ray head for the module's jobs
def test_missing_output_file_is_reported_with_its_batch_id_and_only_its_requests_are_sent_again(tmp_path, subq_bin):
    from pipelines.teacher_server import TeacherServer

    out = tmp_path / "out"
    with TeacherServer(batch_delay_s=0.2, batch_bad_output_first=1, batch_bad_output="missing") as ts:
        s = gen(subq_bin, "--input", "gsm8k:test", "--limit", "3", "--output", str(out), "--base-url", ts.base_url)
        st = bstats(ts)
    first = next(iter(state(out)["shards"].values()))["batch_id"]
    assert s["rows_total"] == 3 and s["failures_open"] == 0
    assert any(first in e and "could not be downloaded" in e for e in s["batch"]["output_errors"])
    assert sorted(st["submitted_twice"]) == sorted(c for c in st["submitted_by_custom_id"] if "|qg|" in c)
    assert len(st["submitted_by_custom_id"]) == 45 and s["batch"]["replies_this_run"] == 45


@pytest.mark.slow
@pytest.mark.usefixtures("cli_ray")  # one Ray head for the module's jobs
def test_budget_stops_submitting_batches_and_a_rerun_goes_on(tmp_path, subq_bin):
    from pipelines.teacher_server import TeacherServer

    out = tmp_path / "out"
    args = ["--input", "gsm8k:test", "--limit", "4", "--output", str(out), "--batch-max-requests", "12"]
    with TeacherServer(batch_delay_s=0.2) as ts:
        s = gen(subq_bin, *args, "--base-url", ts.base_url, "--max-cost-usd", "0.02")
        assert s["stopped"] == "budget" and s["rows_total"] < 4 and s["failures_open"] == 0
        assert s["this_run"]["cost_usd"] <= 0.02
        assert any(v["batch_id"] is None for v in state(out)["shards"].values())  # written, not submitted
        s2 = gen(subq_bin, *args, "--base-url", ts.base_url)
        st = bstats(ts)
    assert s2["rows_total"] == 4 and st["submitted_twice"] == [] and len(st["submitted_by_custom_id"]) == 60


@pytest.mark.slow
@pytest.mark.usefixtures("cli_ray")  # one Ray head for the module's jobs
def test_a_batch_whose_id_never_reached_the_state_file_is_found_again_not_bought_again(tmp_path, subq_bin):
    """The driver killed between `batches.create` returning and the state write: the re-run finds the batch by
    its metadata (and the upload by its file name) instead of creating it again."""
    import shutil

    from pipelines.teacher_server import TeacherServer

    out = tmp_path / "out"
    args = ["--input", "gsm8k:test", "--limit", "2", "--output", str(out)]
    with TeacherServer(batch_delay_s=0.2) as ts:
        gen(subq_bin, *args, "--base-url", ts.base_url)
        st = state(out)
        name, sh = next((n, v) for n, v in st["shards"].items() if v["round"] == "answers")
        sh.update(batch_id=None, file_id=None, status="pending", collected=False)  # as if killed before the write
        (out / "batch" / "state.json").write_text(json.dumps(st))
        shutil.rmtree(out / "parts")  # its problems are pending again; their replies are in the cache
        before = bstats(ts)
        s = gen(subq_bin, *args, "--base-url", ts.base_url)
        after = bstats(ts)
    assert s["rows_total"] == 2
    assert after["batches_created"] == before["batches_created"] and after["uploads"] == before["uploads"]
    assert state(out)["shards"][name]["batch_id"] is not None and after["submitted_twice"] == []
