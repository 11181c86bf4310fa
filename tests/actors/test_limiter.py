"""The cluster rate limiter: pacing maths on a fake clock (no Ray), header parsing, and the named Ray actor
shared by two callers."""

from __future__ import annotations

import time

import pytest

from actors.limiter import TokenBucket, headers_backoff, parse_duration


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.mark.parametrize("text,secs", [("2", 2.0), ("1.5", 1.5), ("120ms", 0.12), ("6m0s", 360.0),
                                       ("1h2m3s", 3723.0), ("20ms", 0.02), ("bogus", None), (None, None)])
def test_parse_duration(text, secs):
    assert parse_duration(text) == (pytest.approx(secs) if secs is not None else None)


def test_headers_backoff_prefers_ms_then_retry_after_then_exhausted_reset():
    assert headers_backoff({"Retry-After-Ms": "250", "retry-after": "3"}) == pytest.approx(0.25)
    assert headers_backoff({"retry-after": "3"}) == 3.0
    h = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s",
         "x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "9s"}
    assert headers_backoff(h) == pytest.approx(1.5)  # only the exhausted limit counts
    assert headers_backoff({"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "1s"}) is None
    assert headers_backoff(None) is None


def test_rpm_pacing_spaces_reservations_evenly():
    clock = FakeClock()
    b = TokenBucket(rpm=60, clock=clock)
    waits = [b.reserve() for _ in range(5)]
    assert waits == pytest.approx([0, 1, 2, 3, 4])
    clock.t += 10  # idle time does not bank more than the burst
    assert b.reserve() == 0 and b.reserve() == pytest.approx(1.0)


def test_burst_allows_that_many_seconds_at_once():
    clock = FakeClock()
    b = TokenBucket(rpm=600, burst_s=1.0, clock=clock)  # 10 req/s, a 1 s burst
    waits = [b.reserve() for _ in range(20)]
    assert sum(w < 1e-9 for w in waits) == 11  # the current slot plus one second's worth
    assert max(waits) == pytest.approx(0.9)


def test_tpm_pacing_and_settle_refund():
    clock = FakeClock()
    b = TokenBucket(tpm=6000, clock=clock, refund_unused=True, admit_margin_s=0.0)  # 100 tokens/s
    assert b.reserve(500) == 0
    assert b.reserve(500) == pytest.approx(5.0)
    b.settle(reserved=500, used=100)  # 400 tokens returned: the next slot moves 4 s earlier
    assert b.reserve(100) == pytest.approx(6.0)
    assert b.stats()["tokens_used"] == 100


def test_admission_gate_spaces_token_calls_from_when_they_were_really_let_go():
    """`admit`, asked right before a call is sent, applies a provider's rule to the times calls really leave: a
    call let go late moves the next one (a bucket smaller than one call banks nothing), which the planned slots
    of `reserve` cannot do. Against such a bucket a planned schedule sends the call after a late one early."""
    from pipelines.teacher_server import _Bucket

    clock = FakeClock()
    b = TokenBucket(tpm=60_000, clock=clock, admit_margin_s=0.0)  # 1,000 tokens/s
    provider = _Bucket(60_000, 0.5, clock=clock)  # holds 500 tokens: less than one call of 1,000
    assert b.admit(1000) == 0.0
    provider.take(1000)
    assert b.admit(1000) == pytest.approx(1.0)  # the next one: a second later
    clock.t += 1.3  # the first of the next two is let go 0.3 s late...
    assert b.admit(1000) == 0.0 and provider.wait_for(1000) == 0.0
    provider.take(1000)
    clock.t += 0.7  # ...the second at its planned time would reach the provider 0.3 s early: a 429
    assert provider.wait_for(1000) > 0
    assert b.admit(1000) == pytest.approx(0.3)  # the gate holds it until the provider has the tokens
    clock.t += 0.3
    assert provider.wait_for(1000) == 0.0 and b.admit(1000) == 0.0
    clock.t += 1.0
    assert b.admit(1000) == 0.0  # let through now, but its process was busy: it really leaves 0.2 s later
    clock.t += 0.2
    b.sent(1000)
    clock.t += 0.9
    assert b.admit(1000) == pytest.approx(0.1)  # a second after it left, not after it was let through
    # a short 429 behind the gate (a one-off late send) moves later calls by at most 2 ms more than the margin
    # learned so far, and that margin decays call by call
    b.report_429(0.05)
    assert b.slack_s == pytest.approx(0.002)
    planned = TokenBucket(tpm=60_000, clock=FakeClock(), admit_margin_s=0.0)  # the planned schedule alone: 0, 1, 2 s whatever happens
    assert [planned.reserve(1000) for _ in range(3)] == pytest.approx([0.0, 1.0, 2.0])
    assert TokenBucket(rpm=60, clock=clock).admit(1000) == 0.0  # no token limit: no gate
    st = b.stats()
    assert st["admits"] == 4 and st["admit_waits"] == 3 and st["late_sends"] == 1


def test_tpm_without_refund_keeps_the_max_tokens_charge():
    clock = FakeClock()
    b = TokenBucket(tpm=6000, clock=clock, admit_margin_s=0.0)
    b.reserve(500)
    b.settle(reserved=500, used=100)
    assert b.reserve(100) == pytest.approx(5.0) and b.stats()["tokens_used"] == 100


def test_429_backs_everyone_off_until_reset():
    clock = FakeClock()
    b = TokenBucket(rpm=6000, clock=clock)
    assert b.reserve() == 0
    assert b.report_429(headers={"retry-after-ms": "2000"}) == pytest.approx(2.0)
    assert b.reserve() == pytest.approx(2.0)  # a caller that never saw the 429 waits too
    assert b.reserve() == pytest.approx(2.01)
    clock.t += 5
    assert b.reserve() == 0
    st = b.stats()
    assert st["n_429"] == 1 and st["backoff_s_total"] == pytest.approx(2.0)


def test_unlimited_bucket_never_waits():
    b = TokenBucket()
    assert all(b.reserve(10_000) == 0 for _ in range(100))


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024**2, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_teacher_actors_in_ray_data_share_one_limiter(ray_cluster):
    """TeacherActor as a Ray Data actor-pool UDF: 2 actors, one named limiter, no 429 from a limited server."""
    import ray

    from actors.limiter_client import get_or_create_limiter
    from actors.teacher import TeacherActor
    from pipelines.teacher_server import TeacherServer
    from subq.problems import load_problems
    from subq.prompts import messages

    with TeacherServer(rpm=1200) as ts:
        lim = get_or_create_limiter("subq-limiter:test-data:gpt-3.5-turbo", rpm=1200)
        items = [{"messages": messages("paper_qg", p.problem), "max_tokens": 64} for p in load_problems("gsm8k:test", 24)]
        kwargs = {"model": "gpt-3.5-turbo", "base_url": ts.base_url, "api_key": "unused"}
        out = ray.data.from_items(items, override_num_blocks=4).map_batches(
            TeacherActor, batch_size=6, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.25,
            fn_constructor_kwargs={"client_kwargs": kwargs, "limiter_name": "subq-limiter:test-data:gpt-3.5-turbo"},
        ).take_all()
        assert len(out) == 24 and all(r["reply"].startswith("Q1:") and r["prompt_tokens"] > 0 for r in out)
        assert ts.stats()["by_status"] == {"200": 24}
        assert ray.get(lim.stats.remote())["reserved"] == 24


@pytest.mark.slow
def test_named_actor_is_shared_and_paces_all_callers(ray_cluster):
    import ray

    from actors.limiter_client import get_or_create_limiter

    a = get_or_create_limiter("subq-limiter:test:model", rpm=60)
    b = get_or_create_limiter("subq-limiter:test:model", rpm=60)
    assert a._actor_id == b._actor_id
    waits = ray.get([a.reserve.remote(), b.reserve.remote(), a.reserve.remote()])
    assert sorted(waits) == pytest.approx([0, 1, 2], abs=0.05)
    ray.get(b.report_429.remote(3.0))
    res = ray.get(a.acquire.remote(0, 0.0))
    assert res["stop"] is None and res["wait_s"] >= 2.9
    st = ray.get(a.stats.remote())
    assert st["n_429"] == 1 and st["reserved"] == 4
    budget = get_or_create_limiter("subq-budget:test", budget_usd=0.01)
    assert ray.get(budget.acquire.remote(0, 0.004))["stop"] is None
    ray.get(budget.settle.remote(0, 0, 0.009, 0.004))
    res = ray.get(budget.acquire.remote(0, 0.004))
    assert res["kind"] == "budget" and "budget" in res["stop"]
    ray.get(budget.stop.remote("bad key"))
    assert ray.get(budget.acquire.remote(0, 0.0))["kind"] == "stopped"


@pytest.mark.slow
def test_limiter_sits_on_its_drivers_node_and_comes_back_after_a_crash(ray_cluster):
    import ray

    from actors.limiter_client import get_or_create_limiter

    lim = get_or_create_limiter("subq-limiter:test-crash:model", rpm=600)
    here = ray.get_runtime_context().get_node_id()

    def info() -> dict:
        return ray._private.state.actors(lim._actor_id.hex())  # from the GCS (no dashboard needed)

    assert info()["Address"]["NodeID"] == here and info()["State"] == "ALIVE"
    ray.kill(lim, no_restart=False)  # the limiter's process dies (OOM, crash): it restarts, callers just wait
    deadline = time.time() + 60
    while info()["NumRestarts"] < 1 and time.time() < deadline:
        time.sleep(0.2)
    assert info()["NumRestarts"] >= 1
    assert ray.get(lim.reserve.remote(), timeout=60) >= 0  # the same handle works after the restart
    assert info()["State"] == "ALIVE" and info()["Address"]["NodeID"] == here


def test_retry_after_is_capped_reported_and_http_dates_are_read():
    from email.utils import formatdate

    from actors.limiter import parse_retry_after

    clk = FakeClock()
    b = TokenBucket(rpm=600, clock=clk, max_retry_after_s=120)
    assert b.report_429(headers={"retry-after": "86400"}) == 120  # not a day-long silent freeze
    st = b.stats()
    assert st["blocked_for_s"] == pytest.approx(120) and st["retry_after_capped"] == 1
    assert st["longest_retry_after_s"] == 86400
    now = time.time()
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1.01)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert headers_backoff({"retry-after": formatdate(time.time() + 10, usegmt=True)}) == pytest.approx(10, abs=1.5)


def test_stricter_limit_wins_and_a_lifted_owner_lets_the_other_limit_apply():
    from actors.limiter import RateLimiter

    lim = RateLimiter()
    import asyncio

    a = asyncio.run(lim.register("job-a", rpm=600, tpm=None))
    assert a["rpm"] == 600 and a["conflict"] is None
    b = asyncio.run(lim.register("job-b", rpm=1200, tpm=50000))
    assert b["rpm"] == 600 and b["tpm"] == 50000 and "600" in b["conflict"] and "1200" in b["conflict"]
    assert lim.bucket.rpm == 600
    asyncio.run(lim.unregister("job-a"))
    assert lim.bucket.rpm == 1200 and lim.bucket.tpm == 50000


@pytest.mark.slow
def test_limiter_outlives_the_job_that_created_it(ray_cluster, tmp_path):
    """A second job on the same endpoint keeps working after the first job (which created the limiter) exits."""
    import subprocess
    import sys

    import ray

    from actors.limiter_client import get_or_create_limiter

    name = "subq-limiter:shared-endpoint:model"
    script = ("import ray, sys; ray.init(address=sys.argv[1], namespace='subq', log_to_driver=False)\n"
              "from actors.limiter_client import get_or_create_limiter\n"
              f"lim = get_or_create_limiter({name!r}, rpm=600)\n"
              "print(ray.get(lim.reserve.remote()))\n")
    r = subprocess.run([sys.executable, "-c", script, ray.get_runtime_context().gcs_address], capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    time.sleep(2)  # the first job's driver is gone; a job-scoped actor would be gone with it
    lim = ray.get_actor(name, namespace="subq")
    assert ray.get(lim.reserve.remote(), timeout=60) >= 0 and ray.get(lim.stats.remote())["rpm"] == 600
    again = get_or_create_limiter(name, rpm=1200)  # a later job asking for more: the stricter limit stays
    st = ray.get(again.stats.remote())
    assert again._actor_id == lim._actor_id and st["rpm"] == 600 and st["reserved"] == 2


def test_provider_headers_teach_missing_limits_and_correct_a_different_token_count():
    clk = FakeClock()
    b = TokenBucket(clock=clk)  # no limits given: learned from the provider's headers
    b.settle(1000, 900, 0.0, {"x-ratelimit-limit-requests": "600", "x-ratelimit-limit-tokens": "60000",
                              "x-ratelimit-remaining-requests": "599", "x-ratelimit-remaining-tokens": "59000"})
    assert b.rpm == 600 and b.tpm == 60000 and b.stats()["learned"] == {"rpm": 600, "tpm": 60000}
    t = TokenBucket(tpm=60000, burst_s=2.0, clock=clk)  # 1,000 tokens/s, 2 s of burst: we would send at once
    assert t.reserve(1000) == 0
    # the provider counted more than we did: only 200 tokens left when it admitted the call 0.1 s ago
    t.settle(1000, 900, 0.0, {"x-ratelimit-limit-tokens": "60000", "x-ratelimit-remaining-tokens": "200"}, age_s=0.1)
    assert t.stats()["corrections"] == 1
    assert t.reserve(1000) == pytest.approx(0.8 - 0.1)  # when the provider will have 1,000 again


@pytest.mark.parametrize("tpm", [60000, 200000])
def test_tpm_pacing_through_the_gate_against_a_bucket_smaller_than_one_call(tpm):
    """The teacher server's own token bucket (1 s of the limit; a call of 1,100 tokens does not fit at 60k TPM, so
    each call must find the bucket full) driven by the limiter on a simulated clock, with 8 callers that each reserve
    their next slot as soon as their reply is back (so slots are handed out ahead of the replies), then pass the
    admission gate. A call let through leaves 0-15 ms later (its process is busy: actor round trip, building the
    request) and reaches the server 0-1 ms after that; it tells the gate when it left (`sent`). Without the gate
    (planned slots only) half of them would be a few ms early. Goal: >= 0.95 of T used, <= 0.5% 429s."""
    import heapq
    import random

    from pipelines.teacher_server import _Bucket

    now = [1000.0]
    clock = lambda: now[0]  # noqa: E731
    server = _Bucket(tpm, 1.0, clock=clock)
    lim = TokenBucket(tpm=tpm, clock=clock)
    rng = random.Random(0)
    cost, n_ok, n_429, oks = 1100, 0, 0, []
    events = []  # (time, seq, kind, caller, sent_at)
    for c in range(8):
        heapq.heappush(events, (now[0], c, "reserve", c, 0.0))
    seq = 8
    while n_ok < 1500:
        t, _, kind, c, sent = heapq.heappop(events)
        now[0] = t
        seq += 1
        if kind == "reserve":
            heapq.heappush(events, (t + lim.reserve(cost), seq, "gate", c, 0.0))
        elif kind == "gate":
            wait = lim.admit(cost)
            if wait > 0:
                heapq.heappush(events, (t + wait, seq, "gate", c, 0.0))
            else:
                heapq.heappush(events, (t + rng.uniform(0.0, 0.015), seq, "leave", c, 0.0))
        elif kind == "leave":
            lim.sent(cost)
            heapq.heappush(events, (t + rng.uniform(0.0, 0.001), seq, "arrive", c, t))
        elif kind == "arrive":
            early = server.wait_for(cost)
            if early > 0:
                n_429 += 1
                h = {"retry-after-ms": str(int(early * 1000) + 1),
                     "x-ratelimit-remaining-tokens": str(max(0, int(server.level)))}
                heapq.heappush(events, (t + 0.005, seq, "429", c, sent))
                lim.report_429(headers=h)
            else:
                server.take(cost)
                n_ok += 1
                oks.append(t)
                h = {"x-ratelimit-limit-tokens": str(tpm), "x-ratelimit-remaining-tokens": str(max(0, int(server.level)))}
                heapq.heappush(events, (t + rng.uniform(0.15, 0.25), seq, ("reply", h), c, sent))
        elif kind == "429":
            heapq.heappush(events, (t, seq, "reserve", c, 0.0))
        else:
            lim.settle(cost, 300, headers=kind[1], age_s=t - sent)
            heapq.heappush(events, (t, seq, "reserve", c, 0.0))
    used = (len(oks) - 201) * cost / (oks[-1] - oks[200]) * 60 / tpm  # after the first 200 calls
    assert n_429 / (n_ok + n_429) <= 0.005, (n_429, n_ok, used)
    assert used >= 0.95, used


def test_acquisitions_made_during_a_round_trip_go_together_in_the_next():
    """The teacher client's path to the limiter actor (AcquireBatcher): one acquisition alone goes at once; 200 made
    at the same moment take a handful of round trips, each caller gets its own wait (its own reservation, in
    order); a failed round trip fails only its own callers."""
    import asyncio

    from actors.limiter_client import AcquireBatcher

    bucket = TokenBucket(rpm=600)  # 0.1 s apart
    sent = []

    async def send(items):
        sent.append(len(items))
        await asyncio.sleep(0.01)  # the round trip
        if any(t == -1 for t, _ in items):
            raise RuntimeError("limiter lost")
        return [{"wait_s": bucket.reserve(t), "stop": None, "kind": None} for t, _ in items]

    async def main():
        b = AcquireBatcher(send)
        one = await b.acquire(0)
        assert sent == [1] and one["wait_s"] == 0.0
        waits = [r["wait_s"] for r in await asyncio.gather(*(b.acquire(0) for _ in range(200)))]
        assert sum(sent[1:]) == 200 and len(sent) - 1 <= 3, sent
        assert waits == sorted(waits) and waits[-1] == pytest.approx(200 * 0.1, abs=0.2)
        with pytest.raises(RuntimeError, match="limiter lost"):
            await b.acquire(-1)
        assert (await b.acquire(0))["stop"] is None  # the next round trip works

    asyncio.run(main())


def test_a_client_on_the_limiters_node_sends_at_the_limiters_start_time(monkeypatch):
    """Send jitter from the limiter's reply (issue 11, token limits with a bucket smaller than one call): a wait
    measured from when the reply arrives shifts each send by that reply's trip, so two calls paced 1.1 s apart
    can reach the provider 1.08 s apart (a 429). A client on the limiter's node sleeps until the limiter's
    `start_at` instead; one on another node (another clock) keeps the relative wait."""
    import asyncio
    from types import SimpleNamespace

    from actors import teacher as T

    slept = []
    real_sleep = asyncio.sleep

    async def fake_sleep(s):
        slept.append(s)

    class SlowReply:  # a limiter actor whose reply takes 50 ms to come back
        def __init__(self, node):
            self.node = node

            async def acquire_many(items):
                t = time.time()
                await real_sleep(0.05)
                return [{"wait_s": 0.2, "start_at": t + 0.2, "node": self.node, "stop": None, "kind": None}
                        for _ in items]

            self.acquire = SimpleNamespace(remote=None)
            self.acquire_many = SimpleNamespace(remote=acquire_many)

    async def run(limiter_node):
        c = T.TeacherClient("gpt-3.5-turbo", "http://127.0.0.1:9/v1", api_key="k")
        c.limiter, c._node = SlowReply(limiter_node), "node-a"
        await c._acquire(100, 0.0)
        return slept.pop()

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)  # records what the client sleeps
    assert asyncio.run(run("node-a")) <= 0.2 - 0.04  # until start_at: the 50 ms trip is not added
    assert asyncio.run(run("node-b")) == pytest.approx(0.2, abs=0.01)  # another node: the relative wait


def test_a_paced_client_holds_only_one_slot_far_ahead():
    """Paced calls (issue 11, token-bound runs): a client with 8 calls waiting does not take 8 slots seconds ahead
    (what the limiter learns meanwhile, e.g. from a late send or the provider's headers, would reach only the
    calls after them); once paced, it holds one slot beyond its horizon and asks for the next when that one is
    near. The calls still go at the limiter's rate, in order."""
    import asyncio

    from actors.teacher import TeacherClient

    made = []

    class Recording(TokenBucket):
        def reserve(self, tokens=0):
            wait = super().reserve(tokens)
            made.append((time.monotonic(), wait))
            return wait

    async def main():
        c = TeacherClient("gpt-3.5-turbo", "http://127.0.0.1:9/v1", api_key="k", limiter=Recording(rpm=600))
        c.SLOT_HORIZON_S = 0.15  # slots every 0.1 s
        sent = []

        async def call(i):
            await c._acquire(100, 0.0)
            sent.append((time.monotonic(), i))

        await asyncio.gather(*(call(i) for i in range(8)))
        return sent

    sent = asyncio.run(main())
    t0 = made[0][0]
    # reservations beyond the first paced one are made shortly before the previous slot, not all at t0
    assert made[-1][0] - t0 >= 0.35, [round(t - t0, 3) for t, _ in made]
    assert all(w <= 0.15 + 0.1 + 0.05 for _, w in made[4:]), made  # never more than one slot past the horizon
    gaps = [b[0] - a[0] for a, b in zip(sent, sent[1:])]
    assert min(gaps) >= 0.09 and sent[-1][0] - sent[0][0] <= 0.7 + 0.1, gaps  # the limiter's rate, no idle slots


@pytest.mark.slow
def test_a_live_jobs_stricter_limit_outlives_the_owner_ttl_and_a_restarted_limiter_gets_it_back(ray_cluster):
    """Two generation jobs on one endpoint (issue 25): job A asks rpm 60 and keeps running past the owner TTL
    (3 s here, 900 s in production); job B then asks rpm 120. A renews, so the stricter 60 still applies (before
    OwnerLease A registered once and lapsed: B's 120 applied). The limiter process then dies and Ray restarts it
    with no owners: both leases register again and 60 applies again. A job that ends unregisters."""
    import time

    import ray

    from actors.limiter_client import OwnerLease, get_or_create_limiter

    name = "subq-limiter:test-lease"
    # 3 s, renewed every 0.25 s: a renewal may be late by seconds on a loaded machine (CI saw a 1 s TTL lapse)
    lim = get_or_create_limiter(name, owner_ttl_s=3.0)

    def stats():
        return ray.get(lim.stats.remote())

    with OwnerLease(name, "job-a", rpm=60, every_s=0.25) as a:
        time.sleep(4.5)  # one and a half TTLs: registered once, A would have lapsed
        assert a.renewals >= 5 and stats()["owners"] == {"job-a": {"rpm": 60, "tpm": None}}
        with OwnerLease(name, "job-b", rpm=120, every_s=0.25) as b:
            assert "rpm 120 asked" in (b.conflict or ""), b.conflict
            st = stats()
            assert st["rpm"] == 60 and set(st["owners"]) == {"job-a", "job-b"}, st
            ray.kill(lim, no_restart=False)  # the process dies; Ray restarts it (max_restarts=-1), owners lost
            deadline = time.time() + 30
            while time.time() < deadline:
                try:
                    st = stats()
                    if set(st["owners"]) == {"job-a", "job-b"}:
                        break
                except ray.exceptions.RayActorError:
                    pass
                time.sleep(0.2)
            assert set(st["owners"]) == {"job-a", "job-b"} and st["rpm"] == 60, st
        assert set(stats()["owners"]) == {"job-a"}  # B ended: unregistered
    ray.kill(lim)


def test_a_teacher_client_keeps_its_limits_registered_and_brings_them_to_a_recreated_limiter(ray_cluster):
    """One registration path for every client: a client that sets its own limits (a Serve solver replica) holds
    them through an OwnerLease that renews past the owner TTL; a client of a job (a generation teacher actor, the
    limits owned by the job's driver) that finds the limiter lost for good creates it again and registers the
    job's limits under the job's owner id, not as a second owner of its own."""
    import asyncio
    import time

    import ray

    from actors.limiter_client import get_or_create_limiter
    from actors.teacher import TeacherClient

    own = "subq-limiter:test-client-own"
    lim = get_or_create_limiter(own, owner_ttl_s=3.0)  # renewed every 0.25 s; 3 s survives a loaded machine
    ray.get(lim.stats.remote())  # started (an actor's process may take seconds to start on a loaded machine)
    client = TeacherClient("gpt-3.5-turbo", "http://127.0.0.1:9/v1", api_key="unused", rpm=60, limiter_name=own,
                           lease_every_s=0.25)
    deadline = time.time() + 60  # inside an event loop the lease registers on its thread, not in the constructor
    while not ray.get(lim.stats.remote())["owners"] and time.time() < deadline:
        time.sleep(0.1)
    assert ray.get(lim.stats.remote())["owners"], "the client's limits never registered"
    time.sleep(4.5)  # one and a half TTLs after registering: registered once, it would have lapsed
    owners = ray.get(lim.stats.remote())["owners"]
    assert len(owners) == 1 and next(iter(owners.values()))["rpm"] == 60, owners
    asyncio.run(client.close())
    assert ray.get(lim.stats.remote())["owners"] == {}
    ray.kill(lim)

    job = "subq-limiter:test-client-job"
    lim = get_or_create_limiter(job, 60, owner="generate:job-1")
    actor_client = TeacherClient("gpt-3.5-turbo", "http://127.0.0.1:9/v1", api_key="unused", rpm=60, limiter=lim,
                                 limiter_name=job, limits_owner="generate:job-1")
    ray.kill(lim, no_restart=True)  # its node was lost: gone for good
    time.sleep(1)
    asyncio.run(actor_client._acquire(10, 0.0))  # the next call finds it gone, creates it again, registers
    st = ray.get(ray.get_actor(job, namespace="subq").stats.remote())
    assert set(st["owners"]) == {"generate:job-1"} and st["rpm"] == 60, st
    ray.kill(ray.get_actor(job, namespace="subq"))
