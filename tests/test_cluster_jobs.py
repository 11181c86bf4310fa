"""A real local Ray head (`ray start --head`, token auth on, dashboard on 127.0.0.1, own temp dir and ports):
a client without the token is refused with a helpful message; `subq submit generate` runs a small generation
job against a real TeacherServer; the teacher key is absent from job info, logs and outputs; `subq jobs`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from subq.problems import load_problems
from subq.schema import read_parquet

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running the tests: `ray`, `subq`, `python`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_ray_pids(temp_dir: str) -> list[int]:
    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in a for a in (p.info["cmdline"] or [])):
                pids.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pids


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
    cmd = [str(BIN / "ray"), "start", "--head", f"--temp-dir={temp_dir}", f"--port={free_port()}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
           "--num-cpus=2", f"--object-store-memory={150 * 1024 ** 2}", "--include-dashboard=true",
           "--disable-usage-stats"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert r.returncode == 0, r.stderr[-3000:]
        address = f"http://127.0.0.1:{dash}"
        yield {"address": address, "token": token, "temp_dir": temp_dir}
    finally:
        pids = _own_ray_pids(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=5)
        for pid in _own_ray_pids(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
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
