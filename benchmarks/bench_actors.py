"""1 vs 4 teacher actors against the teacher server's rate limit (cluster RateLimiter at the same limit).

    .venv/bin/python benchmarks/bench_actors.py                      # defaults below
    .venv/bin/python benchmarks/bench_actors.py --rpm 240 --latency-s 1.0 --problems 16
    ray job submit --working-dir . -- python benchmarks/bench_actors.py   # on a cluster (joins it)

The local teacher server (pipelines.teacher_server) answers with ~`latency` seconds and enforces `rpm` itself
(429 above it). `subq generate` (`run_generate`) runs the same small job with `--actors 1,1` and `--actors 4,4`,
each actor allowing `--per-actor-concurrency` calls in flight, so one actor alone cannot reach the limit
(concurrency / latency * 60 < rpm) and four can. Reported per run: teacher requests, the job's elapsed seconds (its own clock,
Ray Data and actor start-up included), the window from the server's first to its last request (polled every
0.2 s), achieved requests/minute over that window, the busiest 15 s window as rpm, the server's 429 count (any 429
means the global rate went over the limit), and the limiter's own stats. Pass: requests within the limit (the
server's own rule: a token bucket at the limit with 1 s of burst), no 429, and the 4-actor run not slower than
the 1-actor run (compare the request windows: the job time also holds 4 actors' start-up on this machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(actors: int, rpm: float, args, tmp: str) -> dict:
    from pipelines.generate import run_generate
    from pipelines.teacher_server import TeacherServer

    with TeacherServer(rpm=rpm, latency_s=args.latency_s, seed=actors) as ts:
        samples, done = [], threading.Event()

        def poll():  # (time, requests seen by the server), to time the window from first to last request
            while not done.is_set():
                samples.append((time.monotonic(), ts.stats(keys=False)["total"]))
                time.sleep(0.2)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        s = run_generate(dict(input="gsm8k:test", limit=args.problems, output=os.path.join(tmp, f"a{actors}-{rpm}"),
                              base_url=ts.base_url, rpm=rpm, actors=(actors, actors), n_sets=1, n_feedback=1,
                              batch_size=max(1, args.problems // (2 * actors)),
                              max_concurrency=args.per_actor_concurrency, progress_interval_s=30))
        done.set()
        th.join()
        st = ts.stats(keys=False)
    samples.append((time.monotonic(), st["total"]))
    t0 = next(t for t, n in samples if n > 0)
    t1 = next(t for t, n in samples if n == st["total"])
    window = max(t1 - t0, 1e-9)
    peak = 0.0  # most requests in any 15 s window, as rpm
    for i, (ta, na) in enumerate(samples):
        nb = max(n for t, n in samples[i:] if t <= ta + 15)
        peak = max(peak, (nb - na) / 15 * 60)
    el = s["this_run"]["elapsed_s"]
    return {"rpm": rpm, "actors": actors, "requests": st["total"], "completed": st.get("completed"),
            "elapsed_s": el, "window_s": window,
            "achieved_rpm": (st["total"] - 1) / window * 60, "peak15_rpm": peak, "http_429": st["by_status"].get("429", 0),
            "rows": s["rows_total"], "actors_used": s["this_run"]["actors_used"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rpm", type=float, nargs="+", default=[240, 90],
                    help="Teacher server limit(s) = cluster limiter rpm; one 1-vs-4 comparison per limit.")
    ap.add_argument("--latency-s", type=float, default=1.0, help="Teacher reply latency (seconds).")
    ap.add_argument("--problems", type=int, default=16, help="Problems (3 calls each: 1 set, 1 feedback).")
    ap.add_argument("--per-actor-concurrency", type=int, default=2, help="Calls in flight per actor.")
    args = ap.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "unused")
    import ray

    if not os.environ.get("RAY_ADDRESS"):
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024 ** 2, log_to_driver=False)
    else:
        ray.init()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [run(n, rpm, args, tmp) for rpm in args.rpm for n in (1, 4)]
    finally:
        ray.shutdown()
    print(f"\nlatency {args.latency_s}s, {args.per_actor_concurrency} calls in flight per actor, "
          f"{args.problems} problems x 3 calls (QG -> QA -> feedback), limiter rpm = server rpm\n")
    print("| limit rpm | actors | requests | job s | requests window s | achieved rpm | peak 15 s rpm | within limit "
          "(+1 s burst) | HTTP 429 | rows | 4 vs 1 speed-up (job / window) |")
    print("|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|---:|")
    for i, r in enumerate(rows):
        speed = (f"{rows[i - 1]['elapsed_s'] / r['elapsed_s']:.2f}x / {rows[i - 1]['window_s'] / r['window_s']:.2f}x"
                 if r["actors"] == 4 else "")
        # the server's own rule: a token bucket at the limit holding 1 s of burst (+0.2 s polling resolution)
        ok = r["requests"] - 1 <= r["rpm"] / 60 * (r["window_s"] + 1.2) and r["http_429"] == 0
        print(f"| {r['rpm']:.0f} | {r['actors']} | {r['requests']} | {r['elapsed_s']:.1f} | {r['window_s']:.1f} | "
              f"{r['achieved_rpm']:.1f} | {r['peak15_rpm']:.1f} | {'yes' if ok else 'NO'} | {r['http_429']} | "
              f"{r['rows']} | {speed} |")

if __name__ == "__main__":
    main()
