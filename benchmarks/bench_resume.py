"""Resuming a generation run at scale: an output holding N finished problems (synthetic rows in Parquet parts, as
the job writes them) plus a few new problems; `subq generate` is re-run on it against the local teacher server.
Prints a markdown table: driver peak RSS (VmHWM) until the first new teacher call and over the whole run, and
the time from start to the first new call.

    .venv/bin/python benchmarks/bench_resume.py                    # 1,000,000 finished + 8 new problems
    .venv/bin/python benchmarks/bench_resume.py --n 100000 --compare-old

`--compare-old` also times reading every finished row as Python objects (`subq.schema.read_parquet` on the parts:
what resume did before it read only the `problem_id` column), in its own process. Target (issue 11): peak RSS
<= 1 GiB and start <= 60 s at 1,000,000 problems.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def vm_hwm_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def build(root: Path, n: int, new: int, part_rows: int) -> tuple[Path, Path]:
    """problems.jsonl (n + new problems) and out/parts/ with rows for the first n."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from subq.problems import problem_id
    from subq.schema import SubQRow, SubQuestionSet, rows_to_table

    inp = root / "problems.jsonl"
    texts = [f"Synthetic problem {i}: Tom has {i} apples and buys 2 more. How many apples does he have?"
             for i in range(n + new)]
    with inp.open("w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"question": t, "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}) + "\n")
    s = SubQuestionSet.from_texts("Q1: How many apples?", "A1: 2\n\nFinal answer: 2", "#### 2", ["Q1: Yes"])
    base = rows_to_table([SubQRow(problem_id="x", problem="x", gold_answer="#### 2", true_answer=2.0, sets=[s],
                                  source=str(inp), source_index=0, teacher_model="gpt-3.5-turbo",
                                  template_id="paper", prompt_tokens=1, completion_tokens=1, cost_usd=0.0,
                                  attempts=1, error=None)])
    parts = root / "out" / "parts"
    parts.mkdir(parents=True)
    names = base.schema.names
    for k, lo in enumerate(range(0, n, part_rows)):
        hi = min(n, lo + part_rows)
        t = base.take(pa.array([0] * (hi - lo)))
        t = t.set_column(names.index("problem_id"), "problem_id", pa.array([problem_id(x) for x in texts[lo:hi]]))
        t = t.set_column(names.index("problem"), "problem", pa.array(texts[lo:hi]))
        t = t.set_column(names.index("source_index"), "source_index", pa.array(range(lo, hi), pa.int64()))
        pq.write_table(t, parts / f"part-{k:06d}.parquet")
    return inp, root / "out"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--part-rows", type=int, default=10_000)
    ap.add_argument("--compare-old", action="store_true")
    a = ap.parse_args()
    from pipelines.teacher_server import TeacherServer

    rows = []
    with tempfile.TemporaryDirectory() as d:
        t = time.time()
        inp, out = build(Path(d), a.n, a.new, a.part_rows)
        print(f"built {a.n:,} finished rows in {time.time() - t:.0f}s", file=sys.stderr)
        subq = str(Path(sys.executable).parent / "subq")
        with TeacherServer() as ts:
            env = {**os.environ, "OPENAI_API_KEY": "unused"}
            t0 = time.time()
            p = subprocess.Popen([subq, "generate", "--input", str(inp), "--output", str(out), "--base-url",
                                  ts.base_url, "--n-sets", "1", "--n-feedback", "1", "--actors", "1,1",
                                  "--ray-num-cpus", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
            first, peak_first, peak = None, 0.0, 0.0
            while p.poll() is None:
                peak = max(peak, vm_hwm_mib(p.pid) or 0.0)
                if first is None and ts.stats(keys=False)["total"] > 0:
                    first, peak_first = time.time() - t0, peak
                time.sleep(0.2)
            total = time.time() - t0
            stdout, stderr = p.communicate()
            if p.returncode != 0:
                sys.exit(f"generate failed ({p.returncode}): {stderr[-2000:]}")
            s = json.loads(stdout.strip().splitlines()[-1])
            assert s["pending_at_start"] == a.new and s["rows_total"] == a.n + a.new, s
        rows.append(("subq generate (resume: problem_id column)", a.n, f"{peak_first:,.0f}", f"{peak:,.0f}",
                     f"{first:.1f}" if first is not None else "-", f"{total:.1f}"))
        if a.compare_old:
            code = ("import sys, time; t=time.time(); from subq.schema import read_parquet; "
                    "rows = read_parquet(sys.argv[1]); print(len(rows), time.time()-t)")
            t0 = time.time()
            p = subprocess.Popen([sys.executable, "-c", code, str(out / "parts")], stdout=subprocess.PIPE, text=True)
            peak = 0.0
            while p.poll() is None:
                peak = max(peak, vm_hwm_mib(p.pid) or 0.0)
                time.sleep(0.2)
            rows.append(("every row as objects (resume before)", a.n, f"{peak:,.0f}", f"{peak:,.0f}",
                         f"{time.time() - t0:.1f} (read only)", "-"))
    print("| resume | finished problems | driver peak RSS to first call (MiB) | driver peak RSS, whole run (MiB) "
          "| start to first new call (s) | whole run (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


if __name__ == "__main__":
    main()
