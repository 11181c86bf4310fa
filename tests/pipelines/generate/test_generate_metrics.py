"""A running generation job's metrics on Ray's Prometheus export (ray.util.metrics): requests, tokens, $, calls in
flight, limiter wait, problems by status; read from the metrics endpoint while the job runs."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

pytestmark = pytest.mark.slow


def _scrape(port: int) -> dict[str, float]:
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        m = re.match(r"^(ray_subq_[a-z_]+?)(?:_total)?\{.*\} ([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def test_running_job_exports_its_metrics_to_rays_prometheus_endpoint(tmp_path, monkeypatch):
    import ray

    from pipelines.generate import GenerateConfig, run_generate
    from pipelines.teacher_server import TeacherServer, free_port

    port = free_port()
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    # a 1 s report interval (Ray's default is 10 s: a short job on a fast machine ends before its first report)
    ray.init(num_cpus=2, include_dashboard=False, _metrics_export_port=port, log_to_driver=False, namespace="subq",
             _system_config={"metrics_report_interval_ms": 1000})
    try:
        with TeacherServer(latency_s=0.6) as ts:
            cfg = GenerateConfig(input="gsm8k:test", limit=6, output=str(tmp_path / "out"), base_url=ts.base_url,
                                 n_sets=1, n_feedback=1, actors=(1, 1), batch_size=2, rpm=600,
                                 progress_interval_s=1)
            result: dict = {}
            t = threading.Thread(target=lambda: result.update(run_generate(cfg)), daemon=True)
            t.start()
            seen: dict[str, float] = {}
            deadline = time.time() + 240
            while t.is_alive() and time.time() < deadline:
                got = _scrape(port)
                for k, v in got.items():
                    seen[k] = max(seen.get(k, 0.0), v)
                time.sleep(1.0)
            t.join(60)
        assert result.get("rows_total") == 6, result
        for name in ("ray_subq_teacher_requests", "ray_subq_teacher_tokens_in", "ray_subq_teacher_tokens_out",
                     "ray_subq_teacher_cost_usd", "ray_subq_limiter_wait_seconds", "ray_subq_generate_problems"):
            assert seen.get(name, 0) > 0, (name, sorted(seen))
        assert "ray_subq_teacher_in_flight" in seen  # a gauge: present (its value is whatever was in flight)
    finally:
        ray.shutdown()
        os.environ.pop("OPENAI_API_KEY", None)
