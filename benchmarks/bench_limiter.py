"""The cluster rate limiter's throughput: acquisitions/s with 1, 4 and 16 concurrent client actors and the latency
one acquisition adds to a call; prints a markdown table.

    .venv/bin/python benchmarks/bench_limiter.py                  # clients 1,4,16; 64 calls in flight per client
    .venv/bin/python benchmarks/bench_limiter.py --clients 1,4 --seconds 5 --block 16
    .venv/bin/python benchmarks/bench_limiter.py --mode batcher     # the teacher client's path

Each client actor calls the one named, detached RateLimiter (`actors.limiter.get_or_create_limiter`) as the
teacher client does (`acquire`: stop flag, budget, pacing) with `--in-flight` calls outstanding, under a limit
far above what is asked (so the number measures the limiter, not the pacing). `--block N` measures
`acquire_block` (N slots leased per round trip, as clients do at high rates) instead. Latency: mean round trip of
one acquisition with nothing else in flight. Target (issue 11): >= 10,000 acquisitions/s in aggregate.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Client:
    def __init__(self, name: str):
        import ray

        self.lim = ray.get_actor(name, namespace="subq")

    async def run(self, seconds: float, in_flight: int, block: int, batcher: bool = False) -> int:
        from actors.limiter_client import AcquireBatcher

        n = 0
        end = time.monotonic() + seconds
        b = AcquireBatcher(lambda items: self.lim.acquire_many.remote(items))

        async def worker():
            nonlocal n
            while time.monotonic() < end:
                if batcher:  # the teacher client's path (actors.teacher: acquisitions grouped per round trip)
                    await b.acquire(100, 0.0)
                    n += 1
                elif block > 1:
                    res = await self.lim.acquire_block.remote(block, 100, 0.0)
                    n += len(res["waits"])
                else:
                    await self.lim.acquire.remote(100, 0.0)
                    n += 1

        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return n

    async def latency(self, k: int) -> float:
        t = time.perf_counter()
        for _ in range(k):
            await self.lim.acquire.remote(100, 0.0)
        return (time.perf_counter() - t) / k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--in-flight", type=int, default=64)
    ap.add_argument("--block", type=int, default=1)
    ap.add_argument("--mode", choices=["acquire", "batcher"], default="acquire",
                    help="acquire: one actor call per acquisition (or --block N per call); batcher: the teacher "
                         "client's path, acquisitions made during a round trip grouped into the next")
    ap.add_argument("--num-cpus", type=int, default=4)
    a = ap.parse_args()
    import ray

    from actors.limiter_client import get_or_create_limiter

    import os

    if os.environ.get("RAY_ADDRESS"):  # a running cluster
        ray.init(log_to_driver=False, namespace="subq")
    else:
        ray.init(num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False, namespace="subq")
    name = f"subq-limiter:bench-{time.time_ns()}:model"
    lim = get_or_create_limiter(name, rpm=1e9, tpm=1e12)
    Actor = ray.remote(Client).options(num_cpus=0, max_concurrency=1000)
    rows = []
    try:
        one = Actor.remote(name)
        ray.get(one.latency.remote(50))
        lat = ray.get(one.latency.remote(300))
        for n in [int(x) for x in a.clients.split(",")]:
            clients = [Actor.remote(name) for _ in range(n)]
            ray.get([c.latency.remote(5) for c in clients])  # warm: handles resolved, workers up
            t = time.perf_counter()
            counts = ray.get([c.run.remote(a.seconds, a.in_flight, a.block, a.mode == "batcher") for c in clients])
            el = time.perf_counter() - t
            rows.append((n, sum(counts), sum(counts) / el))
            for c in clients:
                ray.kill(c)
        print("| mode | clients | in flight/client | block | acquisitions | acquisitions/s | added latency/call "
              "(1 client, idle) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for n, total, rate in rows:
            print(f"| {a.mode} | {n} | {a.in_flight} | {a.block if a.mode == 'acquire' else '-'} | {total} | "
                  f"{rate:,.0f} | {lat * 1000:.2f} ms |")
    finally:
        ray.kill(lim)
        ray.shutdown()


if __name__ == "__main__":
    main()
