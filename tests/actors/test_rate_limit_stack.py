"""Rate limit through the real stack: one named limiter actor, 2 TeacherActors in a Ray Data actor pool, the real
`openai` client over HTTP, and the local teacher server enforcing a strict token limit: its bucket (0.1 s of TPM,
200 tokens) is smaller than one call (prompt estimate + max_tokens 700, ~1,030 tokens), so a call is admitted only
when the bucket is full: any call that reaches it early is a 429. The backlog (N calls, all queued at once) is N
times that burst. Measured at 120,000 TPM, 60 calls: quiet, no 429 and 0.97 of the limit used; with two busy loops
on the 2 cores, 1 of 61 (1.6%) and 0.87; with the admission gate removed (actors.limiter.TokenBucket.admit always
"go"), 9 of 69 (13%): the test fails then. At 600,000 TPM (10 calls/s; the test until 2026-12-07) the loaded cores
themselves capped the rate beside the suite (0.43 of the limit in a clean-clone run). Asserted: the 429 share <= 5%
and the limit used (tokens the server admitted per minute, first to last answer) >= 0.55 of TPM. The quiet-machine
goal (<= 0.5% 429s, >= 0.95 of a TPM limit after the first minute) is measured by benchmarks/bench_generate.py
--which tpm."""

from __future__ import annotations

import pytest
from conftest import local_ray

pytestmark = pytest.mark.slow

TPM = 120_000  # 2,000 tokens/s: ~1.9 calls/s of ~1,030 tokens (at 600,000 TPM, 10 calls/s, the 2 loaded cores
# themselves capped the rate beside the suite: 0.43 of the limit, with or without a limiter)
BURST_S = 0.1  # the server's bucket: 200 tokens
N = int(__import__("os").environ.get("SUBQ_STACK_N", "60"))



@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    local_ray()
    try:
        yield ray
    finally:
        ray.shutdown()


def run_backlog(ray, tpm: float, n: int, limiter_tpm: float | None) -> dict:
    """n QG calls (max_tokens 700) through 2 TeacherActors sharing one limiter actor against a server limited to
    `tpm` with a bucket of BURST_S seconds. Returns the server's counts and the share of the limit used."""
    from actors.limiter_client import get_or_create_limiter
    from actors.teacher import TeacherActor
    from pipelines.teacher_server import TeacherServer
    from subq.costs import estimate_tokens
    from subq.problems import load_problems
    from subq.prompts import messages

    name = f"subq-limiter:test-stack:{tpm}:{limiter_tpm}"
    with TeacherServer(tpm=tpm, burst_s=BURST_S, record_prompts=True) as ts:
        lim = get_or_create_limiter(name, tpm=limiter_tpm)
        items = [{"messages": messages("paper_qg", p.problem), "max_tokens": 700} for p in load_problems("gsm8k:test", n)]
        kwargs = {"model": "gpt-3.5-turbo", "base_url": ts.base_url, "api_key": "unused", "max_retries": 8,
                  "backoff_initial_s": 0.05}
        out = ray.data.from_items(items, override_num_blocks=4).map_batches(
            TeacherActor, batch_size=n // 4, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.25,
            fn_constructor_kwargs={"client_kwargs": kwargs, "limiter_name": name},
        ).take_all()
        st = ts.stats(keys=False)
        got = sorted(ts.prompts(), key=lambda r: r["t"])
    ray.kill(lim)
    n_ok, n_429 = st["by_status"].get("200", 0), st["by_status"].get("429", 0)
    charged = [estimate_tokens("\n".join(m["content"] for m in r["messages"])) + 700 for r in got]
    # tokens admitted after the first answer, over the time to the last: the rate the limit allowed us
    per_min = sum(charged[1:]) / (got[-1]["t"] - got[0]["t"]) * 60
    assert min(charged) > BURST_S * tpm / 60  # every call is larger than the server's bucket
    return {"rows": len(out), "ok": n_ok, "n_429": n_429, "share_429": n_429 / max(1, n_ok + n_429),
            "use": per_min / tpm, "by_status": st["by_status"]}


def test_backlog_through_limiter_actors_and_openai_client_paces_a_bucket_smaller_than_one_call(ray_cluster):
    r = run_backlog(ray_cluster, TPM, N, TPM)
    print("rate-limit stack:", r)
    assert r["rows"] == N and r["ok"] == N, r  # every call answered once
    assert r["share_429"] <= 0.05, r
    assert r["use"] >= 0.55, r
