"""A real local Ray head (`ray start --head`, token auth on, dashboard on 127.0.0.1, own temp dir and ports):
a client without the token is refused with a helpful message; `subq submit generate` runs a small generation
job against a real TeacherServer; the teacher key is absent from job info, logs and outputs; `subq jobs`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from subq.problems import load_problems
from subq.schema import read_parquet
from tests.conftest import free_port, stop_own_processes

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv running the tests: `ray`, `subq`, `python`


@pytest.fixture(scope="module")
def head():
    """One token-authenticated head for the module; stopped (only ITS processes, found by its temp dir)."""
    temp_dir = tempfile.mkdtemp(prefix="rcj", dir="/tmp")
    token = secrets.token_hex(16)
    dash = free_port()
    # like a node with the subq venv activated: job drivers run `python` from PATH
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    env.pop("OPENAI_API_KEY", None)
    gcs_port = free_port()
    cmd = [str(BIN / "ray"), "start", "--head", f"--temp-dir={temp_dir}", f"--port={gcs_port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
           "--num-cpus=2", f"--object-store-memory={150 * 1024 ** 2}", "--include-dashboard=true",
           "--disable-usage-stats"]
    for _ in range(5):  # `ray start` gives a node 30 s to register: retried on a loaded shared machine
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if r.returncode == 0:
            break
        stop_own_processes(temp_dir, wait_s=5)
    try:
        assert r.returncode == 0, r.stderr[-3000:]
        address = f"http://127.0.0.1:{dash}"
        yield {"address": address, "token": token, "temp_dir": temp_dir, "gcs": f"127.0.0.1:{gcs_port}"}
    finally:
        stop_own_processes(temp_dir, wait_s=5)
        shutil.rmtree(temp_dir, ignore_errors=True)


def subq(*args, token=None, home=None, extra_env=None, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    env["HOME"] = str(home) if home else env.get("HOME", "/root")
    if token:
        env["RAY_AUTH_TOKEN"] = token
    env.update(extra_env or {})
    return subprocess.run([str(BIN / "subq"), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_client_without_token_is_refused_with_what_to_do(head, tmp_path):
    r = subq("jobs", "list", "--address", head["address"], home=tmp_path)  # empty HOME: no ~/.ray/auth_token
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error:") and "requires an authentication token" in err
    assert "RAY_AUTH_TOKEN" in err and "ray get-auth-token" in err
    r = subq("submit", "generate", "--address", head["address"], "--", "--input", "gsm8k:test", home=tmp_path)
    assert r.returncode == 2 and "requires an authentication token" in r.stderr
    r = subq("jobs", "list", "--address", head["address"], token="not-the-token", home=tmp_path)
    assert r.returncode == 2 and "rejected the token from RAY_AUTH_TOKEN" in r.stderr
    assert "not-the-token" not in r.stderr
    # the token found in a file named by RAY_AUTH_TOKEN_PATH is accepted
    f = tmp_path / "tok"
    f.write_text(head["token"])
    r = subq("jobs", "list", "--address", head["address"], home=tmp_path, extra_env={"RAY_AUTH_TOKEN_PATH": str(f)})
    assert r.returncode == 0, r.stderr


def test_submit_generate_succeeds_and_key_never_leaks(head, tmp_path):
    from pipelines.teacher_server import TeacherServer
    from ray.job_submission import JobSubmissionClient

    key = "sk-subq-test-" + secrets.token_hex(12)
    out = tmp_path / "out"
    n = 6
    with TeacherServer(api_key=key, latency_s=0.02) as ts:
        r = subq("submit", "generate", "--address", head["address"], "--wait", "--timeout", "300",
                 "--", "--input", "gsm8k:test", "--limit", str(n), "--output", str(out), "--base-url", ts.base_url,
                 "--actors", "1,2", "--batch-size", "3", "--n-sets", "1", "--n-feedback", "1",
                 "--progress-interval-s", "2",
                 token=head["token"], extra_env={"OPENAI_API_KEY": key}, timeout=400)
        st = ts.stats()
    job_id = r.stdout.strip().splitlines()[0]
    client = JobSubmissionClient(head["address"], headers={"Authorization": f"Bearer {head['token']}"})
    logs = client.get_job_logs(job_id)
    assert r.returncode == 0, r.stdout + r.stderr + logs[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["status"] == "SUCCEEDED"
    # output: every problem exactly once, real teacher replies (the server demanded the key: 401 otherwise)
    ids = [row.problem_id for row in read_parquet(str(out / "parts"))]
    assert sorted(ids) == sorted(p.problem_id for p in load_problems("gsm8k:test", n))
    assert st["completed"] == n * 3 and st["by_status"].get("401", 0) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_total"] == n
    # the key is nowhere: job info (entrypoint, metadata, runtime_env), logs, outputs, `subq jobs` output
    info = client.get_job_info(job_id)
    assert key not in json.dumps(info.model_dump(), default=str) and key not in logs
    assert "env_vars" not in (info.runtime_env or {}) and key not in info.entrypoint
    for f in out.rglob("*"):
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f
    listed = subq("jobs", "list", "--address", head["address"], "--json", token=head["token"])
    assert listed.returncode == 0 and job_id in listed.stdout and key not in listed.stdout
    shown = subq("jobs", "logs", job_id, "--address", head["address"], token=head["token"])
    assert shown.returncode == 0 and "rows_total" in shown.stdout and key not in shown.stdout


def test_jobs_stop_and_unknown_job(head):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head["address"], headers={"Authorization": f"Bearer {head['token']}"})
    jid = client.submit_job(entrypoint="python -c 'import time; time.sleep(120)'")
    stop = subq("jobs", "stop", jid, "--address", head["address"], token=head["token"])
    assert stop.returncode == 0 and json.loads(stop.stdout)["stop_requested"] is True
    for _ in range(60):
        if str(client.get_job_status(jid).value) == "STOPPED":
            break
        time.sleep(1)
    assert str(client.get_job_status(jid).value) == "STOPPED"
    bad = subq("jobs", "logs", "no-such-job", "--address", head["address"], token=head["token"])
    assert bad.returncode == 2 and bad.stderr.startswith("error:")


def test_http_ray_address_shell_submit_jobs_and_local_verbs(head, tmp_path):
    """`export RAY_ADDRESS=http://...:PORT` (the README's cluster recipe), then in that same shell: `subq submit`,
    `subq jobs`, and local verbs. A local verb that starts Ray (`subq generate`) joins the Ray serving that
    dashboard and says so (before: ray.init got the http:// address and failed)."""
    from pipelines.teacher_server import TeacherServer

    shell = {"RAY_ADDRESS": head["address"]}
    r = subq("jobs", "list", token=head["token"], extra_env=shell)
    assert r.returncode == 0, r.stderr
    r = subq("score", str(ROOT / "subq/data/gsm8k-ai-subq/qg_test_data_raw.jsonl"), "--mode", "paper",
             token=head["token"], extra_env=shell)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["n"] == 1319, r.stderr
    r = subq("generate", "--dry-run", "--input", "gsm8k:test", "--limit", "3", "--output", str(tmp_path / "dry"),
             token=head["token"], extra_env=shell)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["dry_run"] is True, r.stderr
    # two generation jobs on one endpoint and one cluster limiter (issue 11): a local job A creates the limiter (30 rpm);
    # while A runs, a submitted job B starts on the same endpoint; then A ends (Ctrl-C, sent once B is calling: A has
    # work for minutes, so a slow start of B cannot find A already finished, as CI once saw). Before, the limiter died
    # with A and every later call of B failed (RayActorError); now B ends with no failure.
    import signal

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head["address"], headers={"Authorization": f"Bearer {head['token']}"})
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(shell, RAY_AUTH_TOKEN=head["token"], OPENAI_API_KEY="unused")
    keys = lambda out: {p.stem for p in (out / "cache").rglob("*.json")} if (out / "cache").exists() else set()  # noqa: E731
    with TeacherServer(latency_s=0.01) as ts:
        common = ["--base-url", ts.base_url, "--actors", "1,1", "--n-sets", "1", "--n-feedback", "1", "--rpm", "30",
                  "--input", "gsm8k:test"]
        a_out, b_out = tmp_path / "local", tmp_path / "job"
        proc_a = subprocess.Popen([str(BIN / "subq"), "generate", *common, "--limit", "40", "--output", str(a_out)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while not keys(a_out) and proc_a.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        r = subq("submit", "generate", "--", *common, "--limit", "5", "--output", str(b_out),
                 token=head["token"], extra_env={**shell, "OPENAI_API_KEY": "unused"}, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        job_id = r.stdout.strip().splitlines()[0]
        while not keys(b_out) and client.get_job_status(job_id) in (JobStatus.PENDING, JobStatus.RUNNING) \
                and time.time() < deadline:
            time.sleep(0.5)
        assert keys(b_out) and proc_a.poll() is None, "B must be calling while A still runs"
        proc_a.send_signal(signal.SIGINT)  # A ends while B runs
        a_stdout, a_stderr = proc_a.communicate(timeout=300)
        assert proc_a.returncode == 130, a_stderr[-3000:]  # stopped by Ctrl-C, its finished rows kept
        assert "is the Jobs API of the Ray running on this machine; joined it" in a_stderr
        a_sum = json.loads((a_out / "summary.json").read_text())
        assert a_sum["stopped"] == "interrupted" and a_sum["rows_total"] < 40, a_sum
        assert client.get_job_status(job_id) == JobStatus.RUNNING  # B outlives A
        while client.get_job_status(job_id) in (JobStatus.PENDING, JobStatus.RUNNING) and time.time() < deadline + 300:
            time.sleep(1)
        logs = client.get_job_logs(job_id)
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-3000:]
        summary = json.loads((b_out / "summary.json").read_text())
        assert summary["rows_total"] == 5 and summary["failures_open"] == 0, summary
        assert "RayActorError" not in logs
    # a GCS address is the driver's business only: the Jobs API is still found (Ray's own lookup)
    r = subq("jobs", "list", "--json", token=head["token"], extra_env={"RAY_API_SERVER_ADDRESS": head["address"],
                                                                     "RAY_ADDRESS": "127.0.0.1:1"})
    assert r.returncode == 0 and r.stdout.count("job_id") >= 1, r.stderr


def test_submit_runtime_env_follow_exit_code_and_entrypoint_resources(head, tmp_path):
    """--runtime-env env_vars reach the job; --follow streams the job's logs and its exit code is the job's
    status; --entrypoint-resources makes the job wait until a node with that resource joins."""
    # --retry-failed with no failures: checks the key variable, then has nothing to do (ends in seconds)
    args = ["--", "--api-key-env", "SUBQ_PROBE_KEY", "--input", "gsm8k:test", "--limit", "1", "--retry-failed",
            "--output", str(tmp_path / "o")]
    bad = subq("submit", "generate", "--address", head["address"], "--follow", *args, token=head["token"],
               timeout=300)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "SUBQ_PROBE_KEY is not set" in bad.stdout  # the job's own error line, streamed
    assert json.loads(bad.stdout.strip().splitlines()[-1])["status"] == "FAILED"
    renv = tmp_path / "renv.yaml"
    renv.write_text("env_vars:\n  SUBQ_PROBE_KEY: not-a-secret\n")
    ok = subq("submit", "generate", "--address", head["address"], "--follow", "--runtime-env", str(renv), *args,
              token=head["token"], timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout.strip().splitlines()[-1])["status"] == "SUCCEEDED"
    # entrypoint resources: the head has no "generation", so the job waits for a node that has it
    sid = "subq-wait-" + secrets.token_hex(4)
    r = subq("submit", "generate", "--address", head["address"], "--submission-id", sid,
             "--entrypoint-resources", '{"generation": 1}', "--runtime-env", str(renv), *args, token=head["token"])
    assert r.returncode == 0 and r.stdout.strip() == sid, r.stderr
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head["address"], headers={"Authorization": f"Bearer {head['token']}"})
    time.sleep(8)
    assert str(client.get_job_status(sid).value) == "PENDING"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head["token"],
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}  # a node with the subq venv activated
    env.pop("RAY_ADDRESS", None)
    for _ in range(3):
        add = subprocess.run([str(BIN / "ray"), "start", f"--address={head['gcs']}",
                              f"--temp-dir={head['temp_dir']}", "--num-cpus=1", '--resources={"generation": 1}',
                              f"--object-store-memory={80 * 1024 ** 2}", "--disable-usage-stats",
                              f"--dashboard-agent-listen-port={free_port()}",
                              f"--dashboard-agent-grpc-port={free_port()}",
                              f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"],
                             env=env, capture_output=True, text=True, timeout=180)
        if add.returncode == 0:
            break
    assert add.returncode == 0, add.stderr[-2000:]
    for _ in range(180):
        if str(client.get_job_status(sid).value) in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
    final = str(client.get_job_status(sid).value)
    assert final == "SUCCEEDED", (final, client.get_job_info(sid).message)


SPY = r'''
"""A concurrent job that tries to read another job's teacher key: from the GCS (every runtime_env package),
from every file under the cluster's temp dir (all nodes' runtime_env caches, logs), and from /proc/*/environ."""
import hashlib, io, json, os, re, sys, zipfile
import ray
from ray.experimental import internal_kv as kv

pattern = re.compile(os.environ["SPY_PREFIX"].encode() + rb"[0-9a-f]{24}")
wanted = set(os.environ["SPY_HASHES"].split(","))
found = []

def scan(data, where):
    for m in set(pattern.findall(data)):
        h = hashlib.sha256(m).hexdigest()
        if h in wanted:
            found.append([where, h])

ray.init()
for k in kv._internal_kv_list(b"gcs://"):
    data = kv._internal_kv_get(k) or b""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for n in z.namelist():
                scan(z.read(n), "gcs:" + k.decode())
    except zipfile.BadZipFile:
        scan(data, "gcs:" + k.decode())
for root in os.environ["SPY_ROOTS"].split(":"):
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            try:
                if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) < 50 * 2 ** 20:
                    scan(open(p, "rb").read(), "file:" + p)
            except OSError:
                pass
skip = {str(os.getpid())} | set(os.environ.get("SPY_SKIP_PIDS", "").split(","))
for pid in os.listdir("/proc"):
    if pid.isdigit() and pid not in skip:
        try:
            scan(open(f"/proc/{pid}/environ", "rb").read(), "environ:" + pid)
        except OSError:
            pass
print("SPY " + json.dumps(found))
'''


def _spy(client, head, key_hashes, planted_dir, skip_pids=()) -> list:
    """Run SPY as another job on the cluster; returns [where, sha256] of every key it could read. `skip_pids`: the
    teacher server, the stand-in for the provider's side, which holds the key by design."""
    (planted_dir / "spy.py").write_text(SPY)
    jid = client.submit_job(entrypoint="python spy.py", runtime_env={
        "working_dir": str(planted_dir),
        "env_vars": {"SPY_PREFIX": "sk-subq-test-", "SPY_HASHES": ",".join(key_hashes),
                     "SPY_ROOTS": head["temp_dir"], "SPY_SKIP_PIDS": ",".join(map(str, skip_pids))}})
    for _ in range(240):
        if str(client.get_job_status(jid).value) in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
    logs = client.get_job_logs(jid)
    line = next((x for x in logs.splitlines() if x.startswith("SPY ")), None)
    assert line, logs[-3000:]
    return json.loads(line[4:])


def test_key_leaves_no_trace_and_a_concurrent_job_cannot_read_it(head, tmp_path):
    """The job's driver reads the key once and destroys the package (its files, its GCS copy, its place in the
    job's runtime_env: no worker unpacks it anywhere). A second job running at the same time searches the GCS,
    every file under the cluster's temp dir and every process environment: it finds a planted control value (so
    it can see) but not the key; after the job, nothing anywhere either."""
    import hashlib

    from pipelines.teacher_server import TeacherServer
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head["address"], headers={"Authorization": f"Bearer {head['token']}"})
    key = "sk-subq-test-" + secrets.token_hex(12)
    control = "sk-subq-test-" + secrets.token_hex(12)
    planted = tmp_path / "spy"
    planted.mkdir()
    (planted / "planted.txt").write_text(control)  # travels in the spy's own working_dir package
    hashes = [hashlib.sha256(key.encode()).hexdigest(), hashlib.sha256(control.encode()).hexdigest()]
    out = tmp_path / "out"
    n = 8
    with TeacherServer(api_key=key, latency_s=1.0, rpm=60, seed=3) as ts:
        r = subq("submit", "generate", "--address", head["address"], "--", "--input", "gsm8k:test", "--limit",
                 str(n), "--output", str(out), "--base-url", ts.base_url, "--actors", "1,1", "--batch-size", "2",
                 "--n-sets", "1", "--n-feedback", "1", "--max-concurrency", "2",
                 token=head["token"], extra_env={"OPENAI_API_KEY": key})
        assert r.returncode == 0, r.stderr
        jid = r.stdout.strip().splitlines()[0]
        for _ in range(240):  # the job runs and its teacher actors use the key
            if ts.stats()["completed"] >= 2 or str(client.get_job_status(jid).value) in ("FAILED", "SUCCEEDED"):
                break
            time.sleep(0.5)
        during = _spy(client, head, hashes, planted, skip_pids=[ts.proc.pid])
        still_running = str(client.get_job_status(jid).value) == "RUNNING"
        for _ in range(400):
            if str(client.get_job_status(jid).value) in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(1)
        st = ts.stats()
    logs = client.get_job_logs(jid)
    assert str(client.get_job_status(jid).value) == "SUCCEEDED", logs[-3000:]
    assert st["by_status"].get("401", 0) == 0 and st["completed"] >= n * 3  # the key reached the actors
    assert still_running, "the job ended before the spy finished: not a concurrent read"
    key_h, control_h = hashes
    assert any(h == control_h and w.startswith("gcs:") for w, h in during), during  # the spy can read the GCS
    assert any(h == control_h and w.startswith("file:") for w, h in during), during  # ... and the nodes' files
    assert not [w for w, h in during if h == key_h], during
    after = _spy(client, head, hashes, planted)
    assert not [w for w, h in after if h == key_h], after
    info = client.get_job_info(jid)
    assert key not in json.dumps(info.model_dump(), default=str) and key not in logs
