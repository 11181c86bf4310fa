"""The local teacher server over real HTTP with the real `openai` SDK, and TeacherClient against it: replay of
the released replies, synthetic (labelled) replies for other problems, 429 + headers, auth/model errors,
injected faults, retries, re-sampling, the durable cache and key hygiene. Plus parse_prompt round trips."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from subq.parsers import parse_answers, parse_feedback, parse_subquestions
from subq.problems import load_problems
from subq.prompts import messages, parse_prompt, render

RELEASED = [json.loads(x) for x in (Path(__file__).resolve().parents[3] / "subq/data/gsm8k-ai-subq/qg_test_data_raw.jsonl").read_text().splitlines()[:3]]


@pytest.mark.parametrize("tid", ["paper_qg", "paper_qa", "paper_feedback", "doc_decompose", "doc_solve"])
def test_parse_prompt_inverts_render(tid):
    for p in load_problems("gsm8k:test", 10):
        qs = None if tid in ("paper_qg", "doc_decompose") else ["How many eggs?", "How much money?"]
        got = parse_prompt(render(tid, p.problem, qs))
        assert got is not None and got[0] == tid
        assert " ".join(got[1].split()) == " ".join(p.problem.split())
        if qs:
            assert got[2] == qs
    assert parse_prompt("hello there") is None


@pytest.fixture(scope="module")
def server():
    from pipelines.teacher_server import TeacherServer

    with TeacherServer() as ts:
        yield ts


@pytest.fixture(scope="module")
def oc(server):
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def _chat(oc, msgs, sample=None, **kw):
    headers = {"x-subq-sample-index": str(sample)} if sample is not None else None
    return oc.chat.completions.with_raw_response.create(model="gpt-3.5-turbo", messages=msgs, max_tokens=512,
                                                        extra_headers=headers, **kw)


pytestmark = pytest.mark.slow


def test_models_and_replay_of_released_replies(oc):
    assert "gpt-3.5-turbo" in [m.id for m in oc.models.list().data]
    rec = RELEASED[0]
    raw = _chat(oc, messages("paper_qg", rec["problem"]), sample=0)
    res = raw.parse()
    assert res.choices[0].message.content == rec["questions"][0]
    assert raw.headers["x-subq-provenance"] == "replay" and res.system_fingerprint == "subq-replay"
    assert res.usage.prompt_tokens > 100 and res.usage.completion_tokens > 5
    qs = parse_subquestions(rec["questions"][0]).questions
    ans = _chat(oc, messages("paper_qa", rec["problem"], qs), sample=0).parse().choices[0].message.content
    assert ans == rec["answers"][0]


def test_unrecorded_problem_gets_labelled_synthetic_replies_from_gold(oc):
    p = load_problems("gsm8k:train", 3)[2]
    raw = _chat(oc, messages("paper_qg", p.problem), sample=1)
    assert raw.headers["x-subq-provenance"] == "synthetic"
    q = parse_subquestions(raw.parse().choices[0].message.content)
    assert q.ok and len(q.questions) >= 2
    a = parse_answers(_chat(oc, messages("paper_qa", p.problem, q.questions)).parse().choices[0].message.content,
                      len(q.questions))
    assert a.ok and a.final_answer == p.gold_answer.split("####")[-1].strip().replace(",", "")
    fb = _chat(oc, messages("paper_feedback", p.problem, q.questions)).parse().choices[0].message.content
    assert parse_feedback(fb, len(q.questions)).ok
    # a solver-style QA with sub-questions never seen, on a recorded problem: still well formed
    rec = RELEASED[1]
    text = _chat(oc, messages("paper_qa", rec["problem"], ["What is x?", "What is y?", "And z?"])).parse()
    assert parse_answers(text.choices[0].message.content, 3).ok


def test_stats_count_completed_calls_by_key(server, oc):
    before = server.stats()
    _chat(oc, messages("paper_qg", RELEASED[2]["problem"]), sample=0)
    after = server.stats()
    assert after["total"] == before["total"] + 1
    assert after["by_status"]["200"] == before["by_status"].get("200", 0) + 1
    assert after["completed"] == before["completed"] + 1 and "api_key" not in after["config"]


def test_rate_limit_429_with_retry_after_and_ratelimit_headers():
    import openai

    from pipelines.teacher_server import TeacherServer

    with TeacherServer(rpm=60, burst_s=1.0) as ts:
        oc = openai.OpenAI(base_url=ts.base_url, api_key="unused", max_retries=0)
        _chat(oc, messages("paper_qg", RELEASED[0]["problem"]))
        with pytest.raises(openai.RateLimitError) as ei:
            _chat(oc, messages("paper_qg", RELEASED[0]["problem"]))
        h = ei.value.response.headers
        assert float(h["retry-after-ms"]) > 0 and int(h["retry-after"]) >= 1
        assert h["x-ratelimit-limit-requests"] == "60" and h["x-ratelimit-remaining-requests"] == "0"
        assert ts.stats()["by_status"] == {"200": 1, "429": 1}


def test_client_bad_key_and_unknown_model_fail_at_once_without_the_key():
    from actors.teacher import TeacherAuthError, TeacherClient, TeacherRequestError
    from pipelines.teacher_server import TeacherServer

    secret = "sk-THIS-IS-A-SECRET-123456"
    with TeacherServer(api_key="right-key", models=["gpt-3.5-turbo"]) as ts:
        c = TeacherClient("gpt-3.5-turbo", ts.base_url, api_key=secret, max_retries=5)
        with pytest.raises(TeacherAuthError) as ei:
            asyncio.run(c.chat(messages("paper_qg", "What is 2+2?")))
        msg = str(ei.value)
        assert ts.base_url in msg and "401" in msg and secret not in msg and "SECRET" not in repr(c)
        assert ei.value.status == 401 and c.stats["attempts"] == 1  # not retried
        c = TeacherClient("gpt-9", ts.base_url, api_key="right-key", price=__import__("subq.costs").costs.Price(0, 0))
        with pytest.raises(TeacherRequestError, match="404"):
            asyncio.run(c.chat(messages("paper_qg", "What is 2+2?")))


def test_client_retries_faults_resamples_malformed_and_caches(tmp_path):
    from actors.teacher import TeacherClient
    from pipelines.teacher_server import TeacherServer

    probs = load_problems("gsm8k-ai-subq:test", 8)
    with TeacherServer(fail_rate=0.3, malformed_rate=0.2, seed=3) as ts:
        c = TeacherClient("gpt-3.5-turbo", ts.base_url, api_key="unused", max_retries=8, backoff_initial_s=0.01,
                          backoff_max_s=0.05, cache_dir=str(tmp_path / "cache"), max_resamples=8)
        valid = lambda t: None if parse_subquestions(t).questions else "no Q lines"  # noqa: E731

        async def go():
            return await asyncio.gather(*(c.chat(messages("paper_qg", p.problem), sample_index=0, validate=valid)
                                          for p in probs))

        res = asyncio.run(go())
        assert all(parse_subquestions(r.text).questions for r in res) and not any(r.cached for r in res)
        st = ts.stats()
        assert st["by_status"].get("500", 0) + st["by_status"].get("503", 0) > 0 and st["malformed"] > 0
        assert c.stats["n_5xx"] > 0 and c.stats["malformed"] > 0
        assert sum(r.attempts for r in res) == st["total"]
        # the durable cache: a fresh client (a resumed job) pays nothing for finished calls
        c2 = TeacherClient("gpt-3.5-turbo", ts.base_url, api_key="unused", cache_dir=str(tmp_path / "cache"))
        again = asyncio.run(c2.chat(messages("paper_qg", probs[0].problem), sample_index=0))
        assert again.cached and again.text == res[0].text and ts.stats()["total"] == st["total"]
        assert all(v == 1 for v in ts.stats()["completed_by_key"].values())


def test_client_gives_up_on_dead_upstream_naming_it():
    from actors.teacher import TeacherClient, TeacherUnavailableError
    from pipelines.teacher_server import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    c = TeacherClient("gpt-3.5-turbo", url, api_key="unused", max_retries=2, backoff_initial_s=0.01, backoff_max_s=0.02)
    with pytest.raises(TeacherUnavailableError) as ei:
        asyncio.run(c.chat(messages("paper_qg", "What is 2+2?")))
    assert url in str(ei.value) and "3 attempts" in str(ei.value)


def test_client_waits_for_the_limit_instead_of_hitting_429():
    from actors.teacher import TeacherClient
    from pipelines.teacher_server import TeacherServer

    with TeacherServer(rpm=600, burst_s=1.0) as ts:
        c = TeacherClient("gpt-3.5-turbo", ts.base_url, api_key="unused", rpm=600)  # local bucket: no Ray here

        async def go():
            return await asyncio.gather(*(c.chat(messages("paper_qg", p.problem))
                                          for p in load_problems("gsm8k:test", 25)))

        asyncio.run(go())
        assert ts.stats()["by_status"] == {"200": 25}


def test_tpm_limit_429_and_client_token_pacing_avoids_it():
    import openai

    from actors.teacher import TeacherClient
    from pipelines.teacher_server import TeacherServer

    probs = load_problems("gsm8k:test", 5)
    with TeacherServer(tpm=60000) as ts:  # 1,000 tokens/s; each call charges its prompt + max_tokens (512)
        oc = openai.OpenAI(base_url=ts.base_url, api_key="unused", max_retries=0)
        _chat(oc, messages("paper_qg", probs[0].problem))
        with pytest.raises(openai.RateLimitError) as ei:
            _chat(oc, messages("paper_qg", probs[1].problem))
        assert ei.value.response.headers["x-ratelimit-limit-tokens"] == "60000"
        from actors.limiter import parse_duration

        time.sleep(parse_duration(ei.value.response.headers["x-ratelimit-reset-tokens"]) + 0.2)  # the bucket is full
        ts.reset_stats()
        c = TeacherClient("gpt-3.5-turbo", ts.base_url, api_key="unused", tpm=60000)

        async def go():
            return await asyncio.gather(*(c.chat(messages("paper_qg", p.problem)) for p in probs))

        asyncio.run(go())
        assert ts.stats()["by_status"] == {"200": 5}  # pacing avoids the 429 (none allowed)


def test_cache_knows_the_endpoint_a_reply_came_from(tmp_path, server):
    """The same --output against another endpoint re-uses no reply; a hit whose recorded endpoint does not match
    (a file copied from elsewhere) is not used either."""
    from actors.teacher import TeacherClient, normalize_endpoint
    from pipelines.teacher_server import TeacherServer

    p = load_problems("gsm8k:test", 1)[0]
    cache = str(tmp_path / "cache")
    first = TeacherClient("gpt-3.5-turbo", server.base_url, api_key="unused", cache_dir=cache)
    a = asyncio.run(first.chat(messages("paper_qg", p.problem), sample_index=0))
    assert not a.cached
    again = TeacherClient("gpt-3.5-turbo", server.base_url + "/", api_key="unused", cache_dir=cache)
    assert asyncio.run(again.chat(messages("paper_qg", p.problem), sample_index=0)).cached  # same endpoint
    with TeacherServer() as other:
        c = TeacherClient("gpt-3.5-turbo", other.base_url, api_key="unused", cache_dir=cache)
        b = asyncio.run(c.chat(messages("paper_qg", p.problem), sample_index=0))
        assert not b.cached and other.stats()["completed"] == 1
        # a cache entry whose provenance says another endpoint wrote it is a miss, and is paid for again
        path = Path(c.cache.path(b.key))
        entry = json.loads(path.read_text())
        path.write_text(json.dumps({**entry, "endpoint": normalize_endpoint(server.base_url)}))
        c2 = TeacherClient("gpt-3.5-turbo", other.base_url, api_key="unused", cache_dir=cache)
        assert not asyncio.run(c2.chat(messages("paper_qg", p.problem), sample_index=0)).cached
        assert other.stats()["completed_by_key"][b.key] == 2 and c2.stats["cache_mismatch"] == 1
    assert normalize_endpoint("HTTP://user:pw@Example.COM:80/v1/?x=1") == "http://example.com/v1"


def test_a_timeout_after_send_is_charged_as_maybe_billed_a_refused_connection_is_not():
    from actors.teacher import BILLING, TeacherClient, TeacherUnavailableError
    from pipelines.teacher_server import TeacherServer, free_port

    msgs = messages("paper_qg", load_problems("gsm8k:test", 1)[0].problem)
    with TeacherServer(timeout_rate=1.0, timeout_hang_s=5) as ts:
        c = TeacherClient("gpt-3.5-turbo", ts.base_url, api_key="unused", rpm=6000, max_retries=1, timeout_s=0.5,
                          backoff_initial_s=0.01, backoff_max_s=0.02)
        acct: dict = {}

        async def go():
            BILLING.set(acct)
            await c.chat(msgs)

        with pytest.raises(TeacherUnavailableError, match="timed out"):
            asyncio.run(go())
        assert ts.stats()["timeouts"] == 2
    assert c.stats["maybe_billed"] == 2 and acct["maybe_billed"] == 2
    assert c.limiter.spent_usd == pytest.approx(c.stats["maybe_billed_usd"]) and c.limiter.spent_usd > 0
    dead = TeacherClient("gpt-3.5-turbo", f"http://127.0.0.1:{free_port()}/v1", api_key="unused", rpm=6000,
                         max_retries=1, backoff_initial_s=0.01, backoff_max_s=0.02)
    with pytest.raises(TeacherUnavailableError):
        asyncio.run(dead.chat(msgs))
    assert dead.stats["maybe_billed"] == 0 and dead.limiter.spent_usd == 0
