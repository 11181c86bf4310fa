"""Generation benchmarks against the local teacher server (pipelines.teacher_server); prints markdown tables.

    .venv/bin/python benchmarks/bench_generate.py                 # both benchmarks
    .venv/bin/python benchmarks/bench_generate.py --which limit --rpm 600 --seconds 40
    ray job submit --working-dir . -- python benchmarks/bench_generate.py --which overhead

(1) `limit`: server limited to L requests/minute with ~200 ms latency. subq (`run_generate`: Ray Data, 2 teacher
    actors, the cluster RateLimiter at L) vs a re-implementation of the released script's strategy (asyncio, a
    semaphore of 10, every failure retried after a fixed 5 s) in the same run. Reported: achieved requests/min / L
    over the steady window (first good reply + 3 s until 95% of the replies), and the share of 429 answers.
(3) `tpm`: server limited only by T tokens/minute, counting each request as a provider admits it (prompt characters
    / 4 + max_tokens, charged on arrival); subq with `--tpm T`. Reported: tokens charged per minute / T over the
    steady window, after the first minute (first good reply + 60 s to the 95% point) and overall, and the share of
    429 answers (all, steady, after the first minute). `--which tpm --tpm 30000 --seconds 180` is the TPM-bound row
    of issue 26 (goal: <= 0.5% 429s and >= 0.95 of T after the first minute).
(2) `overhead`: no limit, zero latency: subq's requests/s (steady window and end to end, Ray start included) vs a
    bare `AsyncOpenAI` loop in one process with the same number of calls in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.teacher_server import TeacherServer  # noqa: E402
from subq.problems import load_problems  # noqa: E402
from subq.prompts import messages  # noqa: E402


class Sampler:
    """Polls the server's /v1/stats every `every` seconds: (t, good replies, 429s, total)."""

    def __init__(self, server: TeacherServer, every: float = 0.5):
        self.server, self.every, self.samples = server, every, []
        self.charged: list = []  # (t, tokens the server charged: prompt + max_tokens of each admitted request)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            s = self.server.stats(keys=False)
            self.samples.append((time.time(), s["by_status"].get("200", 0), s["by_status"].get("429", 0), s["total"]))
            self.charged.append((time.time(), s["charged_tokens"]))
            self._stop.wait(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        s = self.server.stats(keys=False)
        self.samples.append((time.time(), s["by_status"].get("200", 0), s["by_status"].get("429", 0), s["total"]))

    def steady(self, warmup_s: float = 3.0, until: float = 0.95) -> dict:
        final_ok, final_429, final_total = self.samples[-1][1:]
        first = next((t for t, ok, *_ in self.samples if ok > 0), None)
        start = next(((t, ok, n4, tot) for t, ok, n4, tot in self.samples if first is not None and t >= first + warmup_s),
                     None)
        end = next(((t, ok, n4, tot) for t, ok, n4, tot in self.samples if ok >= until * final_ok), None)
        rate = (end[1] - start[1]) / (end[0] - start[0]) if start and end and end[0] > start[0] else float("nan")
        in_window = (end[3] - start[3]) if start and end else 0
        return {"ok": final_ok, "n_429": final_429, "total": final_total, "ok_per_s": rate,
                "share_429": final_429 / final_total if final_total else 0.0,
                "share_429_steady": (end[2] - start[2]) / in_window if in_window > 0 else 0.0,
                "window_s": (end[0] - start[0]) if start and end else 0.0}


def run_subq(ts: TeacherServer, n_problems: int, out: str, rpm: float | None, actors: str = "2,2",
             max_concurrency: int = 32, tpm: float | None = None) -> float:
    """Runs `subq generate` in this process; returns its wall time (its summary is kept in LAST_SUMMARY)."""
    from pipelines.generate import run_generate

    t0 = time.time()
    LAST_SUMMARY.clear()
    LAST_SUMMARY.update(run_generate({"input": "gsm8k:train", "limit": n_problems, "output": out, "base_url": ts.base_url,
                  "rpm": rpm, "tpm": tpm, "actors": actors, "ray_num_cpus": 2, "progress_interval_s": 30,
                  "max_concurrency": max_concurrency, "batch_size": 8}))
    return time.time() - t0


LAST_SUMMARY: dict = {}


async def released_strategy(base_url: str, prompts: list[list[dict]], semaphore: int = 10, retry_s: float = 5.0,
                            deadline_s: float = 1e9) -> None:
    """The release's chatgpt_*.py loop: a semaphore of 10, and on any error sleep 5 s and try again, forever."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
    sem = asyncio.Semaphore(semaphore)
    end = time.time() + deadline_s

    async def one(msgs):
        async with sem:
            while time.time() < end:
                try:
                    return await client.chat.completions.create(model="gpt-3.5-turbo", messages=msgs,
                                                                temperature=0.7, max_tokens=512)
                except Exception:
                    await asyncio.sleep(retry_s)

    await asyncio.gather(*(one(m) for m in prompts))
    await client.close()


async def bare_loop(base_url: str, prompts: list[list[dict]], concurrency: int) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
    sem = asyncio.Semaphore(concurrency)

    async def one(msgs):
        async with sem:
            return await client.chat.completions.create(model="gpt-3.5-turbo", messages=msgs, temperature=0.7,
                                                        max_tokens=512)

    await asyncio.gather(*(one(m) for m in prompts))
    await client.close()


def bench_limit(rpm: float, seconds: float, latency_s: float) -> str:
    per_s = rpm / 60
    n_calls = int(per_s * seconds)
    n_problems = max(4, int(n_calls / 15 * 1.15))  # 15 calls per problem at the paper's settings
    rows = []
    with TeacherServer(rpm=rpm, latency_s=latency_s, latency_jitter_s=latency_s / 4) as ts:
        with tempfile.TemporaryDirectory() as tmp, Sampler(ts) as sm:
            run_subq(ts, n_problems, os.path.join(tmp, "out"), rpm)
        s = sm.steady()
        rows.append(("subq (Ray Data, 2 actors, cluster limiter)", s))
        ts.reset_stats()
        prompts = [messages("paper_qg", p.problem) for p in load_problems("gsm8k:train", n_calls)]
        with Sampler(ts) as sm:
            asyncio.run(released_strategy(ts.base_url, prompts, deadline_s=seconds * 3))
        rows.append(("released script (semaphore 10, fixed 5 s retry)", sm.steady()))
    lines = [f"Benchmark 1: teacher server limited to L = {rpm:.0f} req/min, latency ~{latency_s * 1000:.0f} ms",
             "", "| strategy | good replies | achieved req/min | achieved / L | 429 share | steady window (s) |",
             "|---|---|---|---|---|---|"]
    for name, s in rows:
        lines.append(f"| {name} | {s['ok']} | {s['ok_per_s'] * 60:.0f} | {s['ok_per_s'] * 60 / rpm:.3f} | "
                     f"{s['share_429'] * 100:.2f}% | {s['window_s']:.1f} |")
    return "\n".join(lines)


def bench_tpm(tpms: list[float], seconds: float, latency_s: float) -> str:
    rows = [_tpm_row(t, seconds, latency_s) for t in tpms]
    return "\n".join([f"Benchmark 3: teacher server limited to T tokens/min only (prompt/4 + max_tokens charged on "
                      f"arrival; its bucket holds 1 s of T), latency ~{latency_s * 1000:.0f} ms", "",
                      "| strategy | T | good replies | tokens charged/min | used / T (steady / after 1st min / "
                      "overall) | 429 share (all / steady / after 1st min) | steady window (s) "
                      "| pacing margin learned (ms) |",
                      "|---|---|---|---|---|---|---|---|", *rows])


def _window(samples: list, charged: list, t0: float, t1: float) -> tuple[float, float]:
    """(tokens charged per minute, 429 share) between wall times t0 and t1 (the samples nearest inside)."""
    a = next(((t, c) for t, c in charged if t >= t0), None)
    b = next(((t, c) for t, c in reversed(charged) if t <= t1), None)
    sa = next((x for x in samples if x[0] >= t0), None)
    sb = next((x for x in reversed(samples) if x[0] <= t1), None)
    rate = (b[1] - a[1]) / (b[0] - a[0]) * 60 if a and b and b[0] > a[0] else float("nan")
    tot = (sb[3] - sa[3]) if sa and sb else 0
    return rate, ((sb[2] - sa[2]) / tot if tot > 0 else 0.0)


def _tpm_row(tpm: float, seconds: float, latency_s: float) -> str:
    per_call = 1100  # about: a paper prompt (~600 tokens) + max_tokens 512
    n_problems = max(4, int(tpm / 60 * seconds / per_call / 15 * 1.15))
    with TeacherServer(tpm=tpm, latency_s=latency_s, latency_jitter_s=latency_s / 4) as ts:
        with tempfile.TemporaryDirectory() as tmp, Sampler(ts) as sm:
            run_subq(ts, n_problems, os.path.join(tmp, "out"), None, tpm=tpm)
    s = sm.steady()
    t_first = next((t for t, ok, *_ in sm.samples if ok > 0), sm.samples[0][0])
    first = t_first + 3.0
    final = sm.charged[-1][1]
    a = next(((t, c) for t, c in sm.charged if t >= first), None)
    b = next(((t, c) for t, c in sm.charged if c >= 0.95 * final), None)
    rate = (b[1] - a[1]) / (b[0] - a[0]) * 60 if a and b and b[0] > a[0] else float("nan")
    # after the first minute (from the first good reply + 60 s to the 95% point) and overall (first reply to end)
    late_rate, late_429 = _window(sm.samples, sm.charged, t_first + 60.0, b[0] if b else t_first)
    all_rate, _ = _window(sm.samples, sm.charged, t_first, b[0] if b else t_first)
    return (f"| subq (2 actors, cluster limiter --tpm T) | {tpm:.0f} | {s['ok']} | {rate:.0f} | {rate / tpm:.3f} / "
            f"{late_rate / tpm:.3f} / {all_rate / tpm:.3f} | "
            f"{s['share_429'] * 100:.2f}% / {s['share_429_steady'] * 100:.2f}% / {late_429 * 100:.2f}% | "
            f"{(b[0] - a[0]) if a and b else 0:.1f} | "
            f"{((LAST_SUMMARY.get('limiter') or {}).get('rate') or {}).get('slack_ms', '-')} |")


def bench_overhead(n_problems: int) -> str:
    rows = []
    with TeacherServer() as ts:
        with tempfile.TemporaryDirectory() as tmp, Sampler(ts, every=0.25) as sm:
            wall = run_subq(ts, n_problems, os.path.join(tmp, "out"), None, max_concurrency=32)
        s = sm.steady(warmup_s=1.0)
        rows.append(("subq run_generate (Ray Data, 2 actors)", s, s["ok"] / wall))
        n = s["ok"]
        ts.reset_stats()
        probs = load_problems("gsm8k:train", n)
        prompts = [messages("paper_qg", p.problem) for p in probs]
        t0 = time.time()
        with Sampler(ts, every=0.25) as sm:
            asyncio.run(bare_loop(ts.base_url, prompts, concurrency=64))
        wall = time.time() - t0
        s = sm.steady(warmup_s=0.0)
        rows.append(("bare AsyncOpenAI loop, 1 process, 64 in flight", s, s["ok"] / wall))
    lines = ["Benchmark 2: no limit, zero latency (pipeline overhead)", "",
             "| client | requests | steady req/s | end-to-end req/s (incl. startup) |", "|---|---|---|---|"]
    for name, s, e2e in rows:
        lines.append(f"| {name} | {s['ok']} | {s['ok_per_s']:.1f} | {e2e:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--which", choices=["all", "limit", "tpm", "overhead"], default="all")
    ap.add_argument("--tpm", default="60000,200000",
                    help="T, the server's token limit for benchmark 3 (comma-separated: one row each)")
    ap.add_argument("--rpm", type=float, default=600.0, help="L, the server's limit (requests/minute)")
    ap.add_argument("--seconds", type=float, default=40.0, help="target length of each limited run")
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--overhead-problems", type=int, default=40, help="problems (x15 calls) for benchmark 2")
    a = ap.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "unused")
    out = []
    if a.which in ("all", "limit"):
        out.append(bench_limit(a.rpm, a.seconds, a.latency_ms / 1000))
    if a.which in ("all", "tpm"):
        out.append(bench_tpm([float(t) for t in str(a.tpm).split(",")], a.seconds, a.latency_ms / 1000))
    if a.which in ("all", "overhead"):
        out.append(bench_overhead(a.overhead_problems))
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
