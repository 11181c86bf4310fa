"""`subq generate` you can leave running: exit codes a script can trust (endpoint down -> one `error:` line,
non-zero; some failures -> exit 0 with the count, where the reasons are and the most common ones), one odd
problem's 400 is a recorded failure (`--retry-failed` retries it), settings drift refused with the fields named,
a second job on the same output refused, calls that may have been billed are charged (`maybe_billed`)."""

from __future__ import annotations

import json
import os

import pytest
from test_generate import gen, part_ids

from subq.problems import load_problems

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("cli_ray")]  # one Ray head for the module's jobs

SMALL = ["--input", "gsm8k:test", "--n-sets", "1", "--n-feedback", "1", "--actors", "1,1"]


def _errors(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith("error:")]


def test_endpoint_down_exits_nonzero_with_the_cause_on_one_line(tmp_path, subq_bin):
    from pipelines.teacher_server import free_port

    dead = f"http://127.0.0.1:{free_port()}/v1"
    r = gen(subq_bin, *SMALL, "--limit", "2", "--output", str(tmp_path / "out"), "--base-url", dead,
            "--max-retries", "1", check=False)
    errs = _errors(r.stderr)
    assert r.returncode != 0, r.stderr[-2000:]
    assert len(errs) == 1 and dead in errs[0] and "connect" in errs[0].lower(), r.stderr[-2000:]


def test_a_400_for_one_problem_is_a_recorded_failure_shown_on_screen_and_retried(tmp_path, subq_bin):
    from pipelines.teacher_server import TeacherServer, free_port

    probs = load_problems("gsm8k:test", 4)
    odd = probs[3]  # (problems 0-2 are also in the paper templates' worked examples: other prompts hold them)
    out = tmp_path / "out"
    port = free_port()
    args = [*SMALL, "--limit", "4", "--output", str(out), "--base-url", f"http://127.0.0.1:{port}/v1"]
    with TeacherServer(port=port, reject_problems=[odd.problem[:80]]) as ts:
        r = gen(subq_bin, *args, check=False)
        assert ts.stats()["by_status"].get("400") == 1  # a 400 is not retried
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["rows_total"] == 3 and s["failures_open"] == 1 and s["stopped"] is None
    fails = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["problem_id"] for f in fails] == [odd.problem_id]
    assert "maximum context length" in fails[0]["reason"] and "400" in fails[0]["reason"]
    # the terminal says how many failed, where the reasons are, and the most common reason
    assert "1 of 4 problems failed" in r.stderr and str(out / "failures.jsonl") in r.stderr, r.stderr[-3000:]
    assert "maximum context length" in r.stderr
    with TeacherServer(port=port) as ts:  # the same endpoint, the odd request now accepted
        s = gen(subq_bin, *args, "--retry-failed")
        assert s["pending_at_start"] == 1 and s["rows_total"] == 4 and s["failures_open"] == 0
        assert ts.stats()["completed"] == 3
    assert sorted(part_ids(out)) == sorted(p.problem_id for p in probs)


def test_drift_is_refused_naming_each_field_and_a_second_job_on_the_output_refuses(tmp_path, subq_bin):
    from pipelines.generate.output import OutputLease
    from pipelines.teacher_server import TeacherServer

    out = tmp_path / "out"
    with TeacherServer() as ts:
        s = gen(subq_bin, *SMALL, "--limit", "2", "--output", str(out), "--base-url", ts.base_url)
        assert s["rows_total"] == 2
        sent = ts.stats()["total"]
        config_before = (out / "config.yaml").read_bytes()
        r = gen(subq_bin, *SMALL, "--limit", "3", "--output", str(out), "--base-url", ts.base_url, "--n-sets", "2",
                "--temperature", "0.2", check=False)
        errs = _errors(r.stderr)
        assert r.returncode == 2 and len(errs) == 1 and "n_sets" in errs[0] and "temperature" in errs[0], r.stderr
        assert (out / "config.yaml").read_bytes() == config_before  # a refused run writes nothing
        r = gen(subq_bin, *SMALL, "--limit", "3", "--output", str(out), "--base-url", ts.base_url + "/", check=False)
        assert r.returncode == 0, r.stderr[-2000:]  # the same endpoint written differently is no drift
        r = gen(subq_bin, *SMALL, "--limit", "3", "--output", str(out),
                "--base-url", ts.base_url.replace("127.0.0.1", "localhost"), check=False)
        errs = _errors(r.stderr)
        assert r.returncode == 2 and len(errs) == 1 and "base_url" in errs[0], r.stderr
        assert ts.stats()["total"] == sent + 3  # only the one new problem of the accepted re-run was paid for
        # another job holds the output (a live lease): this one refuses before any call
        with OutputLease(str(out), timeout_s=60):
            r = gen(subq_bin, *SMALL, "--limit", "4", "--output", str(out), "--base-url", ts.base_url, check=False)
        errs = _errors(r.stderr)
        assert r.returncode == 2 and len(errs) == 1 and "another job" in errs[0] and str(os.getpid()) in errs[0]
        assert ts.stats()["total"] == sent + 3


def test_kill_9_at_five_points_then_resume_every_problem_once_no_paid_call_repeated(tmp_path, subq_bin):
    """SIGKILL the whole job (driver and the local Ray it started) at five points: just after it took the lease,
    mid-calls, just after the first part was written, later mid-calls, and in the middle of writing a part (half its
    bytes in the temp file); before each resume a torn temp is also left in parts/ and failures/. The final run holds every problem
    exactly once; no call the job had received (cached) is paid again, only those in flight at a kill."""
    import signal
    import subprocess
    import time

    from pipelines.teacher_server import TeacherServer
    from test_generate import cache_keys

    out = tmp_path / "out"
    n = 12
    args = ["generate", "--ray-num-cpus", "2", "--input", "gsm8k:test", "--limit", str(n), "--output", str(out),
            "--n-sets", "2", "--n-feedback", "1", "--actors", "1,1", "--batch-size", "2", "--rpm", "240"]
    parts = lambda: list((out / "parts").glob("part-*.parquet")) if (out / "parts").exists() else []  # noqa: E731
    keys = lambda: cache_keys(out) if (out / "cache").exists() else set()  # noqa: E731
    points = [("lease taken", lambda: (out / "_lease.json").exists()),
              ("8 calls cached", lambda: len(keys()) >= 8),
              ("first part written", lambda: len(parts()) >= 1),
              ("+12 calls cached", lambda: len(keys()) >= start + 12),
              ("mid-write of a part", lambda: any(p.name not in torn and p.stat().st_size > 0
                                                   for p in (out / "parts").glob("_tmp-*part-*")))]
    env = {**os.environ, "OPENAI_API_KEY": "unused", "RAY_ADDRESS": "local"}  # each killed run owns its Ray
    in_flight_total = 0
    with TeacherServer(latency_s=0.1) as ts:
        for name, reached in points:
            start = len(keys())
            torn = {p.name for p in (out / "parts").glob("_tmp-*")} if (out / "parts").exists() else set()
            run_env = dict(env)
            if name.startswith("mid-write"):  # the job's part writer stops half-way through a temp; killed there
                from subq.storage import FAULT_PAUSE_ENV

                run_env[FAULT_PAUSE_ENV] = "part-"
            proc = subprocess.Popen([subq_bin, *args, "--base-url", ts.base_url], env=run_env, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.time() + 300
            while time.time() < deadline and not reached() and proc.poll() is None:
                time.sleep(0.1)
            assert proc.poll() is None, f"the job ended before the kill point '{name}'"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            last, quiet_since = -1, time.time()
            while time.time() - quiet_since < 2.0:  # the cluster's workers die with their driver
                total = ts.stats(keys=False)["total"]
                if total != last:
                    last, quiet_since = total, time.time()
                time.sleep(0.25)
            # answered by the server but never received by the job (no cache entry): in flight at this kill
            in_flight_total += len(set(ts.stats()["completed_by_key"]) - keys())
            for d in ("parts", "failures"):  # what a kill between writing a temp and renaming it leaves
                (out / d).mkdir(parents=True, exist_ok=True)
                (out / d / f"part-torn-{name.replace(' ', '_')}.parquet.tmp").write_bytes(b"PAR1torn")
                (out / d / f"_tmp-{len(keys())}-part-x.parquet").write_bytes(b"PAR1")
        cached, completed = len(keys()), ts.stats(keys=False)["completed"]
        s = gen(subq_bin, *args[1:], "--base-url", ts.base_url)
        st = ts.stats()
    # the last run sent exactly the calls that had no cached reply, each once
    assert st["completed"] - completed == n * 2 * 3 - cached == s["this_run"]["requests_sent"]
    assert s["rows_total"] == n and s["failures_open"] == 0
    ids = part_ids(out)
    assert len(ids) == len(set(ids)) == n
    assert set(ids) == {p.problem_id for p in load_problems("gsm8k:test", n)}
    assert len(st["completed_by_key"]) == n * 2 * 3 == len(keys())
    # a key completed twice was in flight at a kill (answered, never received); nothing else was paid twice
    assert sum(v - 1 for v in st["completed_by_key"].values()) <= in_flight_total
    assert not [p for d in ("parts", "failures") for p in (out / d).iterdir() if p.name.startswith("_tmp-")
                or p.name.endswith(".tmp")]  # the resume swept the torn temps
