"""`subq serve` / `subq eval` refuse to start what cannot work, at once, with one `error:` line and exit 2, before
any Ray is started: a public host without API keys (unless --insecure), a solver key that is not set, a solver
endpoint that does not answer (issue 12 exposure rule; issue 10 defect 2). And SIGTERM stops a running `subq serve`
gracefully: the request in flight is answered, exit 0 (issue 24)."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from conftest import free_port


def _run(subq_bin, args, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "SUBQ_API_KEYS")}
    e.update(env)
    return subprocess.run([subq_bin, *args], capture_output=True, text=True, timeout=120, env=e)


def _error_lines(r) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]


def test_public_host_without_keys_needs_insecure(subq_bin, tmp_path):
    r = _run(subq_bin, ["serve", "--host", "0.0.0.0", "--check"])
    assert r.returncode == 2 and len(_error_lines(r)) == 1, r.stderr
    assert "API keys" in r.stderr and "--insecure" in r.stderr and "Traceback" not in r.stderr
    assert _run(subq_bin, ["serve", "--host", "0.0.0.0", "--check", "--insecure"]).returncode == 0
    assert _run(subq_bin, ["serve", "--host", "0.0.0.0", "--check"], SUBQ_API_KEYS="k1,k2").returncode == 0
    keys = tmp_path / "keys"
    keys.write_text("sk-team-1\n")
    assert _run(subq_bin, ["serve", "--host", "0.0.0.0", "--check", "--api-keys-file", str(keys)]).returncode == 0
    assert _run(subq_bin, ["serve", "--host", "127.0.0.1", "--check"]).returncode == 0  # loopback: no keys needed


@pytest.mark.parametrize("verb", ["serve", "eval"])
def test_no_solver_key_fails_at_once_naming_the_variable(subq_bin, tmp_path, verb):
    url = f"http://127.0.0.1:{free_port()}/v1"
    args = (["serve", "--port", str(free_port()), "--solver-base-url", url] if verb == "serve" else
            ["eval", "--data", "gsm8k:test", "--limit", "2", "--solver-base-url", url, "--out", str(tmp_path / "r")])
    r = _run(subq_bin, args)
    assert r.returncode == 2 and len(_error_lines(r)) == 1, r.stderr
    assert "OPENAI_API_KEY" in _error_lines(r)[0] and "unused" in _error_lines(r)[0]
    assert not (tmp_path / "r" / "results.json").exists()


@pytest.mark.parametrize("verb", ["serve", "eval"])
def test_solver_endpoint_down_fails_at_once_naming_it(subq_bin, tmp_path, verb):
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    args = (["serve", "--port", str(free_port()), "--solver-base-url", url] if verb == "serve" else
            ["eval", "--data", "gsm8k:test", "--limit", "2", "--solver-base-url", url, "--out", str(tmp_path / "r")])
    r = _run(subq_bin, args, OPENAI_API_KEY="unused")
    assert r.returncode == 2 and len(_error_lines(r)) == 1, r.stderr
    assert f"127.0.0.1:{port}" in _error_lines(r)[0] and "does not answer" in _error_lines(r)[0]


@pytest.mark.slow
def test_sigterm_drains_the_request_in_flight_and_exits_0(subq_bin, tmp_path):
    """SIGTERM (supervisors, Kubernetes, `ray job stop`) is a graceful stop: the request in flight is answered,
    then Serve and Ray shut down and the process exits 0 (issue 24: it died with SIGABRT, "Aborted")."""
    import signal
    import threading

    import httpx

    from pipelines.teacher_server import TeacherServer
    from training.init_model import create_tiny_model

    model = tmp_path / "tiny"
    create_tiny_model(str(model), n_layer=1, n_embd=32)
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SUBQ_VERBOSE")},
           "OPENAI_API_KEY": "unused", "SUBQ_LOG_DIR": str(tmp_path / "logs")}
    with TeacherServer(latency_s=3.0) as solver:  # a slow solver: a /v1/solve stays in flight about 3 s
        proc = subprocess.Popen([subq_bin, "serve", "--decomposer-path", str(model), "--max-new-tokens", "8",
                                 "--solver-base-url", solver.base_url, "--port", str(port), "--num-cpus", "2"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            first = proc.stdout.readline()  # {"status": "serving", ...} once the app is healthy
            assert '"serving"' in first, proc.stderr.read()[-3000:] if proc.poll() is not None else first
            base = json.loads(first)["base_url"]
            answer: dict = {}

            def ask():
                try:
                    answer["r"] = httpx.post(base + "/v1/solve", timeout=120,
                                             json={"problem": "Tom has 3 apples and buys 2 more. How many?"})
                except httpx.HTTPError as e:
                    answer["r"] = e

            t = threading.Thread(target=ask)
            t.start()
            deadline = time.time() + 60
            while solver.stats(keys=False)["in_flight"] == 0 and time.time() < deadline:
                time.sleep(0.05)
            assert solver.stats(keys=False)["in_flight"] == 1, "the request never reached the solver"
            proc.send_signal(signal.SIGTERM)
            t.join(timeout=120)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    r = answer.get("r")
    assert isinstance(r, httpx.Response) and r.status_code == 200, f"in-flight request lost: {r!r}"
    assert "final_answer" in r.json()
    assert proc.returncode == 0, f"exit {proc.returncode}; stderr:\n{err[-3000:]}"
    assert "Aborted" not in err and "Traceback" not in err
