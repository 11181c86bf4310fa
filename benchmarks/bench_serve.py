"""Decomposer serving benchmark: throughput and p50/p99 latency of `POST /v1/decompose` over real HTTP at 1, 8 and
32 concurrent clients, with `@serve.batch` (max_batch_size=32) vs max_batch_size=1, on the tiny model; then the
cost of API-key auth: the same app with keys off and on (`Authorization: Bearer`, SHA-256 + constant-time compare
in the ingress middleware), p50/p99 of `GET /v1/models` (no model work: the overhead shows) and `POST /v1/decompose`.

    .venv/bin/python benchmarks/bench_serve.py                  # tiny random GPT-2 made on the fly
    .venv/bin/python benchmarks/bench_serve.py --model ckpt/bc --requests 128 --max-new-tokens 32
    .venv/bin/python benchmarks/bench_serve.py --auth-only --requests 200    # only the auth off/on rows
    ray job submit --working-dir . -- python benchmarks/bench_serve.py --requests 256

One decomposer replica (autoscaling pinned to 1) so the comparison isolates batching. Greedy decoding, fixed
max_new_tokens; problems are the first GSM8K test problems, cycled.

Bare: the same problems decoded offline in this process (`training.decomposer.generate_subquestions`, same model,
same settings, as many torch threads as the replica has CPUs), in batches of the client count (1, 8, 32: the most a
replica could do with that many requests at once), before Ray starts. The table gives served / bare per row.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


async def drive(base: str, problems: list[str], n_requests: int, concurrency: int, max_new_tokens: int,
                route: str = "/v1/decompose", headers: dict | None = None) -> dict:
    import httpx

    lat: list[float] = []
    errors = 0
    queue = list(range(n_requests))

    async with httpx.AsyncClient(base_url=base, timeout=600, headers=headers or {}) as client:
        async def worker():
            nonlocal errors
            while queue:
                i = queue.pop()
                t0 = time.perf_counter()
                if route == "/v1/models":
                    r = await client.get(route)
                else:
                    r = await client.post(route, json={"problem": problems[i % len(problems)],
                                                       "max_new_tokens": max_new_tokens})
                lat.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"rps": n_requests / wall, "p50_ms": 1000 * pct(lat, 0.5), "p99_ms": 1000 * pct(lat, 0.99),
            "mean_ms": 1000 * statistics.mean(lat), "errors": errors, "wall_s": wall}


def bare_rates(model: str, problems: list[str], n_requests: int, concurrency: list[int], max_new_tokens: int,
               threads: int) -> dict[int, float]:
    """Problems/s of offline batched decoding (batch = the client count), the upper bound of one replica."""
    import torch

    from training.decomposer import generate_subquestions, load_decomposer

    torch.set_num_threads(max(1, threads))
    d = load_decomposer(model)
    generate_subquestions(d, problems[:4], max_new_tokens=max_new_tokens)  # warm-up
    out = {}
    for c in concurrency:
        n = max(n_requests, c)
        todo = [problems[i % len(problems)] for i in range(n)]
        t0 = time.perf_counter()
        for i in range(0, n, c):
            generate_subquestions(d, todo[i:i + c], max_new_tokens=max_new_tokens)
        out[c] = n / (time.perf_counter() - t0)
        print(f"bare offline decoding, batches of {c}: {out[c]:.2f} problems/s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="Decomposer checkpoint (default: a tiny random GPT-2 made now).")
    ap.add_argument("--requests", type=int, default=64, help="Requests per cell (at least the concurrency).")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="Decode budget per request (serving's default).")
    ap.add_argument("--replica-cpus", type=float, default=2.0, help="CPUs of the one decomposer replica (its torch "
                    "threads); the local Ray gets max(2, this) CPUs.")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--batch-sizes", default="32,1", help="max_batch_size settings to compare.")
    ap.add_argument("--batch-wait-s", type=float, default=0.2, help="batch_wait_timeout_s of the batched rows.")
    ap.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one).")
    ap.add_argument("--auth-only", action="store_true", help="Only the API-key auth off/on rows.")
    ap.add_argument("--no-auth", action="store_true", help="Leave out the API-key auth off/on rows.")
    ap.add_argument("--auth-clients", type=int, default=8, help="Concurrent clients of the auth rows.")
    ap.add_argument("--no-bare", action="store_true", help="Leave out the bare offline decoding column.")
    args = ap.parse_args()
    if not args.port:
        from pipelines.teacher_server import free_port

        args.port = free_port()

    import ray
    from ray import serve

    from pipelines.serve import ServeConfig, build_app
    from subq.problems import load_problems

    tmp = tempfile.mkdtemp(prefix="subq-bench-")
    model = args.model
    if model is None:
        from training.init_model import create_tiny_model

        model = f"{tmp}/tiny"
        create_tiny_model(model)
    problems = [p.problem for p in load_problems("gsm8k:test", 64)]
    conc = [int(c) for c in args.concurrency.split(",")]
    bare = {} if args.no_bare or args.auth_only else bare_rates(model, problems, args.requests, conc,
                                                                  args.max_new_tokens, int(args.replica_cpus))
    ray.init(num_cpus=max(2, int(args.replica_cpus)), include_dashboard=False, object_store_memory=150 * 1024**2, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    rows, auth_rows = [], []
    import os

    try:
        for mbs in ([] if args.auth_only else [int(b) for b in args.batch_sizes.split(",")]):
            cfg = ServeConfig(port=args.port, decomposer={"path": model, "max_new_tokens": args.max_new_tokens},
                              max_batch_size=mbs, batch_wait_timeout_s=args.batch_wait_s if mbs > 1 else 0.0,
                              decomposer_max_ongoing_requests=max(32, mbs), decomposer_min_replicas=1,
                              decomposer_num_cpus=args.replica_cpus,
                              decomposer_max_replicas=1, max_queued_requests=1024, ingress_max_ongoing_requests=256)
            serve.run(build_app(cfg), name="bench", route_prefix="/", blocking=False)
            base = f"http://127.0.0.1:{args.port}"
            asyncio.run(drive(base, problems, 8, 4, args.max_new_tokens))  # warm-up
            replica = serve.get_deployment_handle("Decomposer", app_name="bench")
            for c in conc:
                seen = replica.stats.remote().result()["batches"]
                r = asyncio.run(drive(base, problems, max(args.requests, c), c, args.max_new_tokens))
                sizes = replica.stats.remote(since=seen).result()["batch_sizes"]
                r["mean_batch"] = sum(sizes) / max(1, len(sizes))
                rows.append({"max_batch_size": mbs, "clients": c, **r})
                print(f"max_batch_size {mbs}, {c} clients: {r['rps']:.2f} req/s, p50 {r['p50_ms']:.0f} ms, "
                      f"mean batch {r['mean_batch']:.1f} ({r['wall_s']:.0f} s)", flush=True)
            serve.delete("bench")
        key = "sk-bench-" + os.urandom(12).hex()
        os.environ["SUBQ_BENCH_API_KEYS"] = key  # read by build_app in this driver; only its digest is deployed
        for auth in (() if args.no_auth else (False, True)):
            cfg = ServeConfig(port=args.port, decomposer={"path": model, "max_new_tokens": args.max_new_tokens},
                              decomposer_min_replicas=1, decomposer_max_replicas=1, max_queued_requests=1024,
                              decomposer_num_cpus=args.replica_cpus,
                              ingress_max_ongoing_requests=256, api_keys_env="SUBQ_BENCH_API_KEYS" if auth else None,
                              results_root=f"{tmp}/results")
            serve.run(build_app(cfg), name="bench", route_prefix="/", blocking=False)
            base = f"http://127.0.0.1:{args.port}"
            hdrs = {"Authorization": f"Bearer {key}"} if auth else {}
            asyncio.run(drive(base, problems, 8, 4, args.max_new_tokens, headers=hdrs))  # warm-up
            for route in ("/v1/models", "/v1/decompose"):
                n = args.requests if route == "/v1/models" else max(16, args.requests // 4)
                r = asyncio.run(drive(base, problems, n, args.auth_clients, args.max_new_tokens, route, hdrs))
                auth_rows.append({"auth": auth, "route": route, "n": n, **r})
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"\nDecomposer /v1/decompose, {args.model or 'tiny random GPT-2'}, max_new_tokens={args.max_new_tokens}, greedy, 1 replica "
          f"({args.replica_cpus:g} CPUs), {args.requests} requests per cell\n")
    print("| max_batch_size | clients | req/s | p50 ms | p99 ms | mean batch | errors | bare problems/s | served / bare |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = bare.get(r["clients"])
        bare_s, ratio_s = (f"{b:.3g}", f"{r['rps'] / b:.2f}") if b else ("-", "-")
        print(f"| {r['max_batch_size']} | {r['clients']} | {r['rps']:.3g} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
              f"{r['mean_batch']:.1f} | {r['errors']} | {bare_s} | {ratio_s} |")
    if auth_rows:
        print(f"\nAPI-key auth off vs on, {args.auth_clients} clients (GET /v1/models: no model work; /v1/decompose: "
              f"the model)\n")
        print("| route | auth | requests | req/s | p50 ms | p99 ms | errors |")
        print("|---|---|---|---|---|---|---|")
    for r in auth_rows:
        print(f"| {r['route']} | {'on' if r['auth'] else 'off'} | {r['n']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} | {r['errors']} |")
    for route in (("/v1/models", "/v1/decompose") if auth_rows else ()):
        off = next(r for r in auth_rows if r["route"] == route and not r["auth"])
        on = next(r for r in auth_rows if r["route"] == route and r["auth"])
        print(f"\nauth overhead on {route}: p50 {on['p50_ms'] - off['p50_ms']:+.1f} ms, "
              f"p99 {on['p99_ms'] - off['p99_ms']:+.1f} ms")
    by = {(r["max_batch_size"], r["clients"]): r["rps"] for r in rows}
    bs = [int(b) for b in args.batch_sizes.split(",")]
    if len(bs) == 2 and rows:
        print("\nthroughput ratio batched / unbatched: " + ", ".join(
            f"{c} clients {by[(bs[0], c)] / by[(bs[1], c)]:.2f}x" for c in conc))


if __name__ == "__main__":
    main()
