"""Ctrl-C and SIGTERM stop `subq generate` every time, whatever it is doing (issue 24, item 7; `subq serve`'s
SIGTERM is in test_serve_cli.py).

The interleaving that lost a Ctrl-C: Python runs a signal handler at the main thread's next bytecode boundary, and
that can be inside a weakref callback or finalizer, here importlib's module-lock callback
(`_get_module_lock.<locals>.cb`) at the end of an import: the KeyboardInterrupt raised there is printed as
"Exception ignored in ..." and dropped, and `generate --api batch` went on polling. It happened in 2 of 90 runs of
`subq generate --api batch` with SIGINT at random moments (both times inside that callback, during the driver's
imports). `test_a_stop_handled_inside_a_weakref_callback_still_stops_the_batch_driver` recreates it on purpose;
`test_stop_at_random_moments_always_stops_the_batch_driver` repeats the stop at random moments."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# Run `subq generate` (the CLI's own main) with one change: right after the batch driver's first poll sees its
# batch in progress, a weakref callback runs on the main thread and the stop signal is handled inside it, exactly
# where importlib's module-lock callback swallowed a Ctrl-C.
TRAP = r"""
import os, signal, sys, weakref
import openai.resources.batches as ob

SIG = getattr(signal, os.environ["TRAP_SIGNAL"])
_retrieve = ob.Batches.retrieve
fired = []


class _Lock:
    pass


def retrieve(self, *a, **k):
    b = _retrieve(self, *a, **k)
    if b.status == "in_progress" and not fired:
        fired.append(1)
        lock = _Lock()

        def cb(ref):  # a weakref callback, like importlib's: an exception raised in it is "ignored"
            signal.raise_signal(SIG)  # the handler runs here, inside the callback

        r = weakref.ref(lock, cb)
        del lock  # the callback runs now, on the main thread
    return b


ob.Batches.retrieve = retrieve
from pipelines.cli import main

main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def batch_server():
    """The teacher server with the Batch API; a batch takes 300 s, so every run below is still polling when stopped."""
    from pipelines.teacher_server import TeacherServer

    with TeacherServer(batch_delay_s=300.0) as ts:
        yield ts


def _env(tmp: Path) -> dict:
    return {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SUBQ_VERBOSE")},
            "OPENAI_API_KEY": "unused", "SUBQ_LOG_DIR": str(tmp / "logs")}


def _batch_args(out: Path, base_url: str) -> list[str]:
    return ["generate", "--api", "batch", "--batch-poll-s", "0.2", "--progress-interval-s", "1", "--input",
            "gsm8k:test", "--limit", "3", "--output", str(out), "--base-url", base_url]


def _stop_wait(proc: subprocess.Popen, sig: int, limit_s: float) -> tuple[bool, float, str]:
    """Send SIG, wait up to limit_s: (stopped, seconds it took, stderr)."""
    t0 = time.time()
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=limit_s)
        return True, time.time() - t0, err
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return False, time.time() - t0, err


def _check_stopped_run(out: Path, sig: int, rc: int, err: str) -> list[str]:
    """What a stop must leave: the exit code of its signal, and once batches exist, the summary (stopped:
    interrupted), the ids to resume or cancel, and the output's lease released (a re-run is accepted)."""
    problems = []
    # the signal came before any subq code ran (the interpreter's own start): Python's default ends the process
    before_main = not out.exists() and (rc == -sig or (rc == 1 and "Fatal Python error: init_import_site" in err))
    if rc != 128 + sig and not before_main:
        problems.append(f"exit {rc}, expected {128 + sig}")
    if (out / "batch" / "state.json").exists() and not before_main:
        s = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
        if s.get("stopped") != "interrupted":
            problems.append(f"summary.json stopped={s.get('stopped')!r} (exists: {(out / 'summary.json').exists()})")
        if "--cancel" not in err:
            problems.append("no line saying how to resume or cancel the running batches")
        if (out / "_lease.json").exists():
            problems.append("the output's lease was not released")
    return problems


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_handled_inside_a_weakref_callback_still_stops_the_batch_driver(tmp_path, sig, batch_server):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", TRAP, *_batch_args(out, batch_server.base_url)],
                            env={**_env(tmp_path), "TRAP_SIGNAL": signal.Signals(sig).name},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=30)  # the trap sends the signal itself, at its first poll
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        logs = "".join(p.read_text()[-3000:] for p in (tmp_path / "logs").glob("*.log"))
        pytest.fail(f"still running 30 s after {signal.Signals(sig).name} was handled in a weakref callback; "
                    f"log:\n{logs}")
    assert not _check_stopped_run(out, sig, proc.returncode, err), (_check_stopped_run(out, sig, proc.returncode,
                                                                                       err), err[-3000:])
    assert json.loads((out / "summary.json").read_text())["stopped"] == "interrupted"


REPEATS = int(os.environ.get("SUBQ_STOP_REPEATS", "40"))


def test_stop_at_random_moments_always_stops_the_batch_driver(tmp_path, subq_bin, batch_server):
    """REPEATS runs of `subq generate --api batch` (no Ray: the cheapest whole command), each sent SIGINT or SIGTERM
    at a random moment between its start and its first polls, two at a time; every one must stop within 15 s and
    leave what a stop leaves. On the code before issue 24 a SIGINT was lost in about 2% of such runs (and every
    SIGTERM killed the command without a summary)."""
    seed = int(os.environ.get("SUBQ_STOP_SEED", str(time.time_ns() % 10**9)))
    rng = random.Random(seed)
    plan = [(i, signal.SIGINT if i % 2 == 0 else signal.SIGTERM, rng.uniform(0.3, 6.0)) for i in range(REPEATS)]
    limit_s = 15.0

    def one(run):
        i, sig, delay = run
        out = tmp_path / f"run{i}"
        proc = subprocess.Popen([subq_bin, *_batch_args(out, batch_server.base_url)], env=_env(tmp_path / f"run{i}"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        stopped, took, err = _stop_wait(proc, sig, limit_s)
        problems = [] if stopped else [f"still running {limit_s:.0f} s after the signal"]
        if stopped:
            problems += _check_stopped_run(out, sig, proc.returncode, err)
        return i, signal.Signals(sig).name, delay, took, problems, err

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, plan))
    bad = [r for r in results if r[4]]
    report = "\n".join(f"run {i} {name} at {d:.2f}s: {'; '.join(p)}\n    stderr: {e[-600:]!r}"
                       for i, name, d, _, p, e in bad)
    assert not bad, f"{len(bad)} of {len(results)} stops failed (SUBQ_STOP_SEED={seed}):\n{report}"
    took = sorted(r[3] for r in results)
    print(f"{len(results)} stops: median {took[len(took) // 2]:.2f} s, max {took[-1]:.2f} s after the signal")


def test_sigterm_stops_online_generation_like_ctrl_c(tmp_path, subq_bin):
    """Online mode (Ray Data actors): SIGTERM while rows are being written keeps the finished rows, writes the
    summary (stopped: interrupted), releases the output and exits 143, within seconds. Before issue 24 Ray's own
    SIGTERM handler killed the local Ray first and the command died without a summary."""
    from pipelines.teacher_server import TeacherServer

    out = tmp_path / "out"
    with TeacherServer(latency_s=0.2) as ts:
        proc = subprocess.Popen([subq_bin, "generate", "--input", "gsm8k:test", "--limit", "40", "--output", str(out),
                                 "--base-url", ts.base_url, "--actors", "1,1", "--batch-size", "1",
                                 "--ray-num-cpus", "2", "--progress-interval-s", "1"],
                                env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            deadline = time.time() + 240
            while time.time() < deadline and proc.poll() is None and not list(out.glob("parts/part-*.parquet")):
                time.sleep(0.2)
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            stopped, took, err = _stop_wait(proc, signal.SIGTERM, 60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    print(f"online generate stopped {took:.1f} s after SIGTERM")
    assert stopped and proc.returncode == 143, (proc.returncode, err[-3000:])
    assert took < 30, f"took {took:.1f} s to stop"
    s = json.loads((out / "summary.json").read_text())
    assert s["stopped"] == "interrupted" and 0 < s["rows_total"] < 40, s
    assert not (out / "_lease.json").exists()
    assert "Traceback" not in err and "Aborted" not in err
