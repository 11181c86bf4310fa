"""`subq serve` / `subq eval` refuse to start what cannot work, at once, with one `error:` line and exit 2, before
any Ray is started: a public host without API keys (unless --insecure), a solver key that is not set, a solver
endpoint that does not answer (issue 12 exposure rule; issue 10 defect 2)."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    url = f"http://127.0.0.1:{_free_port()}/v1"
    args = (["serve", "--port", str(_free_port()), "--solver-base-url", url] if verb == "serve" else
            ["eval", "--data", "gsm8k:test", "--limit", "2", "--solver-base-url", url, "--out", str(tmp_path / "r")])
    r = _run(subq_bin, args)
    assert r.returncode == 2 and len(_error_lines(r)) == 1, r.stderr
    assert "OPENAI_API_KEY" in _error_lines(r)[0] and "unused" in _error_lines(r)[0]
    assert not (tmp_path / "r" / "results.json").exists()


@pytest.mark.parametrize("verb", ["serve", "eval"])
def test_solver_endpoint_down_fails_at_once_naming_it(subq_bin, tmp_path, verb):
    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    args = (["serve", "--port", str(_free_port()), "--solver-base-url", url] if verb == "serve" else
            ["eval", "--data", "gsm8k:test", "--limit", "2", "--solver-base-url", url, "--out", str(tmp_path / "r")])
    r = _run(subq_bin, args, OPENAI_API_KEY="unused")
    assert r.returncode == 2 and len(_error_lines(r)) == 1, r.stderr
    assert f"127.0.0.1:{port}" in _error_lines(r)[0] and "does not answer" in _error_lines(r)[0]
