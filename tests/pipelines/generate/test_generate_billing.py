"""Issue 26: the bill we report is the provider's bill. The teacher server keeps a provider-like bill (OpenAI's
usage API shape); `subq generate` (online and `--api batch`) reports exactly what it bills; no paid call is
wasted (Batch re-runs, sibling sets, --retry-failed); the output lease is exclusive; no credentials in names or
files; the README's /v1/solve check fails on an HTTP error."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import subq_generate

REPO = Path(__file__).resolve().parents[3]


def gen(subq_bin, *args, check=True, timeout=300):
    return subq_generate(subq_bin, *args, progress_s=1, check=check, timeout=timeout)


def bstats(ts) -> dict:
    return httpx.get(ts.base_url + "/stats/batches", timeout=30).json()


# ------------------------------------------------------------------ the provider's bill


@pytest.mark.slow
@pytest.mark.usefixtures("cli_ray")  # one Ray head for the module's jobs
def test_server_bill_in_the_usage_api_shape_counts_every_200_and_marks_batch():
    import openai

    from pipelines.teacher_server import TeacherServer

    with TeacherServer(malformed_rate=0.5, malformed_body_share=1.0, fail_rate=0.3, seed=3) as ts:
        c = openai.OpenAI(base_url=ts.base_url, api_key="unused", max_retries=0)
        n200 = 0
        for i in range(20):
            try:
                c.chat.completions.with_raw_response.create(model="gpt-4o-mini", max_tokens=30,
                                                            messages=[{"role": "user", "content": f"hello {i}"}])
                n200 += 1
            except openai.APIStatusError:
                pass
        st = ts.stats(keys=False)
        bill = ts.bill()
        page = ts.usage(start_time=int(time.time()) - 3600, bucket_width="1h", group_by=["model", "batch"])
    assert st["by_status"].get("200") == n200 and 0 < n200 < 20 and st["malformed"] > 0
    assert bill["requests"] == bill["online"]["requests"] == n200  # truncated 200s billed, 5xx not
    assert bill["batch"]["requests"] == 0 and bill["input_tokens"] >= n200
    assert page["object"] == "page" and page["data"][0]["object"] == "bucket"
    res = [r for b in page["data"] for r in b["results"]]
    assert res and all(r["object"] == "organization.usage.completions.result" and r["model"] == "gpt-4o-mini"
                       and r["batch"] is False for r in res)
    assert sum(r["num_model_requests"] for r in res) == n200


@pytest.mark.slow
@pytest.mark.usefixtures("cli_ray")  # one Ray head for the module's jobs
def test_summary_tokens_and_cost_equal_the_provider_bill_online_then_batch(tmp_path, subq_bin):
    """Acceptance: online with 5% 5xx + 10% replies in no format, then --api batch with per-request errors and
    invalid QG replies: summary.json's input/output tokens == the server's bill, cost_usd == the bill priced."""
    from pipelines.teacher_server import TeacherServer
    from subq.costs import PriceTable

    price = PriceTable().price("gpt-3.5-turbo")
    with TeacherServer(fail_rate=0.05, malformed_rate=0.10, malformed_body_share=0.0, seed=7,
                       batch_error_rate=0.05, batch_malformed_rate=0.15, batch_delay_s=0.3) as ts:
        s = gen(subq_bin, "--input", "gsm8k:train", "--limit", "12", "--output", str(tmp_path / "online"),
                "--base-url", ts.base_url, "--actors", "1,1", "--backoff-initial-s", "0.05", "--backoff-max-s", "0.2")
        online = ts.bill()["online"]
        b = gen(subq_bin, "--api", "batch", "--batch-poll-s", "0.2", "--input", "gsm8k:train", "--limit", "12",
                "--output", str(tmp_path / "batch"), "--base-url", ts.base_url)
        bill = ts.bill()
        st = ts.stats(keys=False)
    t = s["this_run"]
    assert st["malformed"] > 0 and st["by_status"].get("500", 0) + st["by_status"].get("503", 0) > 0
    assert (t["prompt_tokens"], t["completion_tokens"]) == (online["input_tokens"], online["output_tokens"]), \
        (t, online)
    assert t["cost_usd"] == pytest.approx(price.cost(online["input_tokens"], online["output_tokens"]), abs=2e-6)
    assert t["maybe_billed"] == 0
    bt, batch = b["this_run"], bill["batch"]
    assert bill["online"] == online  # the batch run bought nothing online
    assert (bt["prompt_tokens"], bt["completion_tokens"]) == (batch["input_tokens"], batch["output_tokens"]), \
        (bt, batch)
    assert bt["cost_usd"] == pytest.approx(price.batch().cost(batch["input_tokens"], batch["output_tokens"]),
                                           abs=2e-6)
    assert b["batch"]["cost_usd_batch"] == pytest.approx(bt["cost_usd"], abs=2e-6)
    assert sum(v["cost_usd"] for v in bt["by_stage"].values()) == pytest.approx(bt["cost_usd"], abs=1e-5)


# ------------------------------------------------------------------ no paid call wasted


@pytest.mark.slow
@pytest.mark.usefixtures("cli_ray")  # one Ray head for the module's jobs
def test_batch_rerun_after_kill_buys_nothing_twice_and_nothing_cached_or_out_of_run(tmp_path, subq_bin):
    """kill -9 while a Batch round runs with shards still waiting, then a re-run for fewer problems: no request is
    bought twice, no batch holds a cached request or a problem outside the re-run."""
    from pipelines.teacher_server import TeacherServer

    out = tmp_path / "out"
    args = ["--api", "batch", "--batch-poll-s", "0.2", "--output", str(out), "--batch-max-requests", "3",
            "--batch-max-in-flight", "1"]
    with TeacherServer(batch_delay_s=1.0) as ts:
        env = {**os.environ, "OPENAI_API_KEY": "unused"}
        proc = subprocess.Popen([subq_bin, "generate", *args, "--input", "gsm8k:test", "--limit", "6",
                                 "--base-url", ts.base_url], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        state = out / "batch" / "state.json"
        deadline = time.time() + 120
        while time.time() < deadline:  # kill once one QG batch is collected and another runs
            try:
                sh = list(json.loads(state.read_text())["shards"].values())
            except (OSError, ValueError):
                sh = []
            if sum(v["collected"] for v in sh) >= 1 and any(v["batch_id"] and not v["collected"] for v in sh):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the driver finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        before = bstats(ts)["submitted_by_custom_id"]
        cached_before = {p.stem for p in (out / "cache").rglob("*.json")}
        assert cached_before and len(before) < 18
        s = json.loads(subprocess.run([subq_bin, "generate", *args, "--input", "gsm8k:test", "--limit", "2",
                                       "--base-url", ts.base_url], env=env, capture_output=True, text=True,
                                      timeout=300, check=True).stdout.strip().splitlines()[-1])
        after = bstats(ts)
    assert s["rows_total"] == 2 and s["failures_open"] == 0
    assert after["submitted_twice"] == []
    new = {c for c in after["submitted_by_custom_id"] if c not in before}
    from subq.problems import load_problems

    run_ids = {p.problem_id for p in load_problems("gsm8k:test", 2)}
    assert new and {c.split("|")[0] for c in new} <= run_ids, sorted(new)
    assert not any(c.split("|")[1] == "qg" and c in before for c in new)


def test_a_failed_set_cancels_its_siblings_pending_calls():
    """One sub-question set's call raises: the problem is recorded failed and its other sets' calls are
    cancelled, not left running (and paying) in the background."""
    from actors.teacher import TeacherRequestError
    from pipelines.generate import GenerateActor

    actor = GenerateActor(dict(model="gpt-3.5-turbo", base_url="http://127.0.0.1:9/v1", api_key="unused"), None,
                          None, dict(template="paper", n_sets=3, n_feedback=3, temperature=0.7, max_tokens=64,
                                     model="gpt-3.5-turbo", output="unused"))
    finished = []

    async def chat(msgs, *, sample_index=0, template_id=None, **kw):
        if template_id.endswith("qg") and sample_index == 0:
            await asyncio.sleep(0.05)
            raise TeacherRequestError("HTTP 400: refused", upstream="x", status=400)
        await asyncio.sleep(0.5)  # a paid call in flight
        finished.append((template_id, sample_index))
        raise AssertionError("never reached: the QG reply is not parsed in this test")

    actor.client.chat = chat

    async def main():
        out = await actor.process(dict(problem_id="p1", problem="Tom has 3 apples. How many?",
                                       gold_answer="#### 3", source="t", source_index=0))
        await asyncio.sleep(1.0)
        return out

    out = asyncio.run(main())
    assert out["status"] == "failed"
    assert finished == [], f"sibling calls kept running after the failure: {finished}"


@pytest.mark.slow
@pytest.mark.usefixtures("cli_ray")  # one Ray head for the module's jobs
def test_batch_retry_failed_resubmits_exactly_the_failed_requests(tmp_path, subq_bin):
    from pipelines.teacher_server import TeacherServer

    out = tmp_path / "out"
    args = ["--api", "batch", "--batch-poll-s", "0.2", "--input", "gsm8k:test", "--limit", "3", "--output", str(out),
            "--batch-max-submissions", "1", "--n-feedback", "1"]
    with TeacherServer(batch_delay_s=0.3, batch_expire_first=1) as ts:
        s1 = gen(subq_bin, *args, "--base-url", ts.base_url)
        first = bstats(ts)["submitted_by_custom_id"]
        s2 = gen(subq_bin, *args, "--base-url", ts.base_url, "--retry-failed")
        after = bstats(ts)
    assert s1["failures_open"] > 0
    assert s2["rows_total"] == 3 and s2["failures_open"] == 0, s2
    resent = {c for c, n in after["submitted_by_custom_id"].items() if n > first.get(c, 0)}
    # exactly the requests without a result: the QG requests the expired batch never ran (9 // 2 = 4 of 9 ran),
    # then the answers of the sets they belong to; nothing already answered is bought again
    assert len([c for c in resent if "|qg|" in c]) == 9 - 4, sorted(resent)
    assert all(c.split("|")[1] == "qg" or c not in first for c in resent)
    assert after["submitted_twice"] == sorted(c for c in resent if "|qg|" in c)


# ------------------------------------------------------------------ the lease


def _lease_contender(out: str, start_at: float, q, slow_write: bool) -> None:
    from pipelines.generate.output import OutputLease

    if slow_write:  # this job's storage is slow (a network disk under load): its writes land 120 ms late
        os.environ["SUBQ_FAULT_SLOW_WRITE"] = "_lease.json:0.12"
    while time.time() < start_at:
        pass
    try:
        lease = OutputLease(out, 30.0).acquire()
        q.put("won")
        time.sleep(0.2)  # hold it while the other one tries
        lease.release()
    except Exception as e:  # noqa: BLE001
        q.put(f"refused: {type(e).__name__}")


@pytest.mark.slow
@pytest.mark.usefixtures("cli_ray")  # one Ray head for the module's jobs
def test_two_jobs_started_within_10ms_never_both_hold_the_lease(tmp_path):
    import pipelines.generate  # noqa: F401  (imported once, before the forks)

    ctx = mp.get_context("fork")
    both = []
    for i in range(25):
        out = str(tmp_path / f"o{i}")
        os.makedirs(out)
        if i % 5 == 4:  # a stale lease of a dead process: both race to take it over
            Path(out, "_lease.json").write_text(json.dumps({"host": os.uname().nodename, "pid": 2 ** 22 - 7,
                                                            "run_id": "gone", "heartbeat": time.time()}))
        q = ctx.Queue()
        t0 = time.time() + 0.2
        ps = [ctx.Process(target=_lease_contender, args=(out, t0 + d, q, slow))
              for d, slow in ((0.0, i % 2 == 0), ((i % 10) / 1000, False))]
        for p in ps:
            p.start()
        res = [q.get(timeout=30) for _ in ps]
        for p in ps:
            p.join(10)
        if res.count("won") != 1:
            both.append((i, res))
    assert both == [], both


def test_lease_takeover_of_a_stale_lease_and_heartbeat(tmp_path):
    from pipelines.generate.output import OutputLease

    out = tmp_path / "o"
    out.mkdir()
    (out / "_lease.json").write_text(json.dumps({"host": "elsewhere", "pid": 1, "run_id": "old",
                                                 "heartbeat": time.time() - 10}))
    lease = OutputLease(str(out), 4.0)
    with pytest.raises(Exception, match="another job"):
        OutputLease(str(out), 60.0).acquire()  # 10 s old: fresh for a 60 s timeout
    lease.acquire()  # stale for a 4 s timeout: taken over
    hb = json.loads((out / "_lease.json").read_text())["heartbeat"]
    time.sleep(1.5)
    assert json.loads((out / "_lease.json").read_text())["heartbeat"] > hb
    lease.release()
    assert not (out / "_lease.json").exists()


# ------------------------------------------------------------------ no secret in names or files


def test_userinfo_in_a_base_url_never_reaches_names_files_or_errors(tmp_path):
    from actors.limiter_client import limiter_name
    from actors.teacher import TeacherClient
    from pipelines.generate_config import GenerateConfig
    from subq.config import load_config
    from subq.errors import SubqError

    url = "https://user:s3cr3t-pw@api.example.com/v1"
    assert "s3cr3t" not in limiter_name(url, "gpt-4o") and "user" not in limiter_name(url, "gpt-4o")
    with pytest.raises(SubqError) as e:
        load_config(GenerateConfig, None, {"output": str(tmp_path / "o"), "base_url": url})
    assert "s3cr3t" not in str(e.value) and "base_url" in str(e.value.field)
    with pytest.raises(SubqError) as e2:
        TeacherClient("gpt-4o", url, api_key="k")
    assert "s3cr3t" not in str(e2.value) and "s3cr3t" not in repr(e2.value)


def test_readme_solve_check_fails_on_an_http_error():
    text = (REPO / "README.md").read_text()
    calls = [ln for ln in text.splitlines() if re.match(r"\s*curl\b", ln) and "/v1/" in ln]
    assert calls
    for ln in calls:
        flags = re.findall(r"\s-([A-Za-z]+)", ln)
        assert any("f" in f for f in flags) or "--fail" in ln, ln
