"""Fault tolerance on a real multi-node Ray cluster (`ray.cluster_utils.Cluster`: a head and two workers, token
auth on): a worker node hosting a teacher actor is removed while `subq generate` runs; the job still finishes
with every problem exactly once, and no call whose reply was already recorded is sent to the teacher again."""

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

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent  # the venv running the tests: its `subq` console script


def test_worker_node_lost_mid_generation_every_problem_once_no_completed_call_resent(tmp_path):
    """Runs `scenario` in its own interpreter: token auth is process-global in Ray (the cached RayConfig and the
    C++ token loader), so a token cluster in the pytest process would break every later `ray.init()` there."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=600)
    print(r.stdout[-2000:])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-6000:]
    assert "SCENARIO OK" in r.stdout


def scenario(tmp_path: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.teacher_server import TeacherServer

    assert os.environ.get("RAY_AUTH_MODE") == "token" and os.environ.get("RAY_AUTH_TOKEN")
    # Cluster() records its address in Ray's default temp dir ($RAY_TMPDIR/ray, else /tmp/ray), whatever temp_dir
    # the head uses
    from ray._common.utils import get_default_ray_temp_dir

    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
    mem = 100 * 1024 ** 2
    temp_dir = tempfile.mkdtemp(prefix="rcm", dir="/tmp")  # short: AF_UNIX socket paths
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, object_store_memory=mem,
                                                                include_dashboard=False,
                                                                temp_dir=temp_dir))
    workers = [cluster.add_node(num_cpus=1, object_store_memory=mem) for _ in range(2)]
    cluster.wait_for_nodes()
    out = tmp_path / "out"
    n = 12
    proc = None
    try:
        ray.init(address=cluster.address, namespace="subq-test", log_to_driver=False)
        with TeacherServer(latency_s=0.25, rpm=300, seed=1) as ts:
            cfg = tmp_path / "gen.yaml"
            cfg.write_text("actor_num_cpus: 1\nmax_concurrency: 4\n")  # one actor per 1-CPU node
            env = {**os.environ, "OPENAI_API_KEY": "unused", "RAY_ADDRESS": cluster.address}
            proc = subprocess.Popen(
                [str(BIN / "subq"), "generate", "--input", "gsm8k:test", "--limit", str(n), "--output", str(out),
                 "--base-url", ts.base_url, "--actors", "2,2", "--config", str(cfg), "--batch-size", "2",
                 "--n-sets", "1", "--n-feedback", "1", "--rpm", "300", "--progress-interval-s", "2"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            # wait until teacher actors run and some replies are recorded, then find a worker hosting one
            victim, deadline = None, time.time() + 120
            while victim is None and time.time() < deadline and proc.poll() is None:
                cached = list((out / "cache").rglob("*.json")) if (out / "cache").exists() else []
                if len(cached) >= 4:
                    alive = [a for a in ray._private.state.actors().values() if a["State"] == "ALIVE"]
                    hosts = {a["Address"]["NodeID"] for a in alive if "GenerateActor" in a.get("ActorClassName", "")}
                    # the cluster limiter lives on its driver's node, not on a worker that can disappear
                    limiters = [a for a in alive if a.get("ActorClassName") == "RateLimiter"]
                    assert limiters and all(a["Address"]["NodeID"] == a["OwnerAddress"]["NodeID"] for a in limiters)
                    driver_node = limiters[0]["OwnerAddress"]["NodeID"]
                    victim = next((w for w in workers if w.node_id in hosts and w.node_id != driver_node), None)
                time.sleep(0.2)
            assert victim is not None, "no teacher actor ran on a worker node: " + (proc.stderr.read()
                                                                                    if proc.poll() is not None else "")
            cluster.remove_node(victim, allow_graceful=False)  # the node dies: its actor and in-flight calls too
            recorded = {p.stem for p in (out / "cache").rglob("*.json")}  # replies recorded before the loss
            sent_before = ts.stats()["total"]
            stdout, stderr = proc.communicate(timeout=300)
            st = ts.stats()
        assert proc.returncode == 0, stderr[-4000:]
        summary = json.loads(stdout.strip().splitlines()[-1])
        assert summary["rows_total"] == n and summary["not_done"] == 0 and summary["failures_open"] == 0
        ids = [r.problem_id for r in read_parquet(str(out / "parts"))]
        assert sorted(ids) == sorted(p.problem_id for p in load_problems("gsm8k:test", n))  # each exactly once
        exported = [json.loads(x)["problem"] for x in (out / "paper_raw.jsonl").read_text().splitlines()]
        assert len(exported) == n == len(set(exported))
        # no completed call re-sent: every reply recorded before the node died was served exactly once
        by_key = st["completed_by_key"]
        assert recorded and all(by_key.get(k) == 1 for k in recorded), {k: by_key.get(k) for k in recorded}
        assert st["completed"] >= n * 3 and sent_before < st["total"]  # work went on after the loss
        print(f"node removed after {len(recorded)} recorded replies; duplicates (in-flight at loss): "
              f"{st['duplicates']}; total requests {st['total']}")
        print("SCENARIO OK")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    scenario(Path(sys.argv[1]))
