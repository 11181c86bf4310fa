"""Online vs Batch API generation against the local teacher server; prints a markdown table.

    .venv/bin/python benchmarks/bench_batch.py                            # 200 problems, 30 s simulated batches
    .venv/bin/python benchmarks/bench_batch.py --problems 50 --batch-delay-s 10

The same `subq generate` command runs twice on the same problems (gsm8k:test), each into a fresh output:
`--api online` (Ray Data, 2 teacher actors, server latency ~200 ms, a 3,000 requests/minute limit) and
`--api batch` (the server processes each batch in `--batch-delay-s`, the simulated batch latency; real providers
take minutes to 24 h). Reported per mode: $ per 1,000 problems (the price table's gpt-3.5-turbo price; batch at
`Price.batch()`, 50%), wall time of the command, chat requests the server answered, HTTP calls the driver made to
the Batch API (uploads, creates, polls, downloads), and the driver process's peak resident memory (VmHWM of the
`subq generate` process, sampled while it runs; Ray's worker processes are not included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.teacher_server import TeacherServer  # noqa: E402

SUBQ = str(Path(sys.executable).parent / "subq")


def _hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run(args: list[str]) -> tuple[dict, float, float]:
    """Run `subq generate ARGS`; (summary, wall seconds, driver peak RSS in MiB)."""
    env = {**os.environ, "OPENAI_API_KEY": "unused"}
    t0 = time.time()
    proc = subprocess.Popen([SUBQ, "generate", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _hwm_kib(proc.pid))
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    wall = time.time() - t0
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"subq generate {' '.join(args)} failed ({proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), wall, peak[0] / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--batch-delay-s", type=float, default=30.0, help="simulated processing time of one batch")
    ap.add_argument("--latency-ms", type=float, default=200.0, help="online reply latency")
    ap.add_argument("--rpm", type=float, default=3000.0, help="online requests/minute limit (server and client)")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, TeacherServer(latency_s=a.latency_ms / 1000, rpm=a.rpm, burst_s=2,
                                                             batch_delay_s=a.batch_delay_s) as ts:
        common = ["--input", "gsm8k:test", "--limit", str(a.problems), "--base-url", ts.base_url]
        before = ts.stats(keys=False)
        s, wall, mem = run([*common, "--output", f"{tmp}/online", "--api", "online", "--actors", "2,2",
                            "--rpm", str(a.rpm), "--ray-num-cpus", "2"])
        after = ts.stats(keys=False)
        rows.append(("online", s, wall, after["total"] - before["total"], None, mem))
        import httpx

        b0 = httpx.get(ts.base_url + "/stats/batches", timeout=30).json()
        s, wall, mem = run([*common, "--output", f"{tmp}/batch", "--api", "batch", "--batch-poll-s", "1"])
        b1 = httpx.get(ts.base_url + "/stats/batches", timeout=30).json()
        rows.append(("batch", s, wall, b1["requests_answered"] - b0["requests_answered"], b1["api_calls"] - b0["api_calls"],
                     mem))
    print(f"\n{a.problems} problems of gsm8k:test, 15 calls each; online latency {a.latency_ms:.0f} ms at "
          f"{a.rpm:.0f} rpm; simulated batch latency {a.batch_delay_s:.0f} s per batch\n")
    print("| mode | rows | $ / 1,000 problems | wall s | chat requests | Batch API calls | batches | driver peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, s, wall, reqs, api_calls, mem in rows:
        per_k = s["this_run"]["cost_usd"] / max(1, s["rows_total"]) * 1000
        nb = len((s.get("batch") or {}).get("batch_ids") or [])
        print(f"| {mode} | {s['rows_total']} | {per_k:.3f} | {wall:.1f} | {reqs} | "
              f"{'-' if api_calls is None else api_calls} | {nb or '-'} | {mem:.0f} |")
    on, ba = rows[0][1]["this_run"]["cost_usd"], rows[1][1]["this_run"]["cost_usd"]
    print(f"\nbatch / online $: {ba / on:.3f} (target <= 0.5)")


if __name__ == "__main__":
    main()
