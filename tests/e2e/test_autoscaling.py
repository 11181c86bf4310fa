"""Autoscaling generation, end to end and offline, on Ray's own autoscaler (the fake multi-node provider: each
"node" is a real raylet on this machine) with token authentication on.

The head advertises no `generation`; the `ray.worker.cpu_generation` type (min 0, max 3, 2 teacher actors a
node) does. `subq submit generate --actors 1,3` goes to the cluster's Jobs API against a local `subq
teacher-server` (replay, latency so a backlog builds): the autoscaler launches generation nodes for the teacher
actor pool, the pool grows past one actor and every problem is written exactly once. A second job, started at once
on the nodes the first left, loses one generation node mid-run (its raylet is killed) and still ends with every
problem exactly once; with no job left the idle generation nodes are removed. The scenario prints a timeline (time, nodes by type, actors alive, rows done).

GPU training pre-flight (issue 24) on a second fake cluster: a head without GPUs and a `ray.worker.gpu` type (min
0, max 2, a logical `GPU: 1` each, no CUDA). `--num-workers 3` is refused at once naming the maximum (no node
launched, nothing written); a 1 s `node_wait_s` fails naming it and withdraws its request; `--num-workers 2`
makes pre-flight ask the autoscaler for the nodes, wait for them (saying so) and run its storage/model/data checks
on exactly those two nodes.

Runs in its own interpreter: token authentication is process-global in Ray. Never `ray stop`:
`AutoscalingCluster.start()` would run `ray stop --force` (every Ray on the machine), so the head is started here
the same way, with its own temp dir and ports, and only its own processes are stopped.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
N = 10  # problems per job


def _run_scenario(args: list[str], drop_env: tuple[str, ...], timeout: float) -> tuple[dict, str]:
    """This file as a script, in its own interpreter with token auth on: (its REPORT, its stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *drop_env)}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), PYTHONUNBUFFERED="1",
               PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=timeout)
    print(r.stdout[-6000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-6000:]
    return json.loads(next(x for x in r.stdout.splitlines() if x.startswith("REPORT "))[7:]), r.stderr


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return _run_scenario([str(tmp_path_factory.mktemp("autoscale"))], ("OPENAI_API_KEY",), 1500)[0]


def test_generation_job_scales_nodes_and_actors_up_then_idle_nodes_down(report):
    grow = report["grow"]
    assert grow["status"] == "SUCCEEDED"
    assert grow["max_generation_nodes"] >= 1 and grow["generation_nodes_at_start"] == 0  # launched for the pool
    assert grow["max_actors"] >= 2  # the pool grew past one actor while there was a backlog
    assert grow["exactly_once"] and grow["rows"] == N
    assert grow["generation_nodes_at_end"] == 0  # idle generation nodes removed once no job is left
    assert grow["teacher_401"] == 0  # the key reached the actors on the new nodes


@pytest.fixture(scope="module")
def gpu_preflight(tmp_path_factory):
    """The GPU pre-flight scenario (`gpu_preflight_scenario`) on its own fake autoscaling cluster."""
    rep, stderr = _run_scenario(["--gpu-preflight", str(tmp_path_factory.mktemp("gpu_preflight"))],
                                ("NCCL_SOCKET_IFNAME",), 1200)
    rep["stderr"] = stderr
    return rep


def test_gpu_preflight_refuses_more_workers_than_the_autoscaler_maximum_before_any_work(gpu_preflight):
    """Head without GPUs, GPU type min 0 max 2 (1 GPU each): --num-workers 3 fails at once naming the maximum; no
    node is launched and nothing is written."""
    over = gpu_preflight["over"]
    assert over["error"] and "field 'num_workers'" in over["error"] and "\n" not in over["error"], over
    assert "at most 2" in over["error"] and "ray.worker.gpu" in over["error"], over["error"]
    assert over["gpu_nodes_after"] == 0 and not over["run_dir_exists"], over


def test_gpu_preflight_launches_the_gpu_nodes_and_checks_them(gpu_preflight):
    """--num-workers 2 with no GPU node up: pre-flight reads the GPU type's maximum from the autoscaler's config,
    asks for the nodes, waits (saying so), and runs its storage/model/data checks on the launched GPU nodes."""
    ok = gpu_preflight["ok"]
    assert ok["error"] is None, ok["error"]
    assert ok["gpu_nodes_before"] == 0 and len(ok["gpu_node_ids"]) == 2, ok
    assert sorted(ok["checked_node_ids"]) == sorted(ok["gpu_node_ids"]), ok  # the checks ran there, not on the head
    assert set(ok["checks"]) >= {"storage_path", "model", "data"}, ok
    assert "waiting" in gpu_preflight["stderr"] and "ray.worker.gpu" in gpu_preflight["stderr"]
    assert ok["pending_placement_groups_after"] == 0, ok  # its node request is withdrawn once the nodes are up


def test_gpu_preflight_wait_for_nodes_has_a_timeout(gpu_preflight):
    """Nodes that do not come within the wait: one error naming node_wait_s, and the node request withdrawn."""
    short = gpu_preflight["short"]
    assert short["error"] and "field 'node_wait_s'" in short["error"] and "within 1 s" in short["error"], short
    assert short["placement_groups_after"] == 0, short


def test_generation_job_survives_losing_a_worker_node(report):
    kill = report["kill"]
    assert kill["killed_node"] and kill["rows_at_kill"] < N  # killed mid-job
    assert kill["status"] == "SUCCEEDED" and kill["exactly_once"] and kill["rows"] == N


# ---------------------------------------------------------------- the scenario (own interpreter)

GENERATION_TYPES = {
    "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
    "ray.worker.cpu_generation": {"resources": {"CPU": 2, "generation": 2, "object_store_memory": 80 * 2 ** 20},
                                  "node_config": {}, "min_workers": 0, "max_workers": 3},
}


def start_head(tmp: Path, node_types: dict | None = None, max_workers: int = 3, idle_minutes: float = 0.2) -> dict:
    """`ray start --head --autoscaling-config` like AutoscalingCluster.start(), minus its `ray stop --force`."""
    import yaml

    from tests.conftest import free_port, stop_own_processes

    temp_dir = tempfile.mkdtemp(prefix="ras", dir="/tmp")  # short: AF_UNIX socket paths
    gcs, dash = free_port(), free_port()
    cfg = yaml.safe_load((ROOT / "cluster" / "ray_cluster.local.yaml").read_text())
    cfg["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"
    cfg["idle_timeout_minutes"] = idle_minutes
    cfg["max_workers"] = max_workers
    cfg["available_node_types"] = node_types or GENERATION_TYPES
    cfg_path = tmp / "autoscaling.json"
    cfg_path.write_text(json.dumps(cfg))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "SUBQ_AUTOSCALED_RESOURCES": "generation"}
    cmd = ["ray", "start", "--head", f"--autoscaling-config={cfg_path}", f"--temp-dir={temp_dir}", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--num-cpus={int(cfg['available_node_types']['ray.head.default']['resources']['CPU'])}",
           f"--object-store-memory={120 * 2 ** 20}", "--include-dashboard=true", "--disable-usage-stats"]
    markers = [temp_dir, f"--gcs-address=127.0.0.1:{gcs}", f"gcs_address=127.0.0.1:{gcs}"]
    for _ in range(5):  # a node has 30 s to register: retried on a loaded shared machine
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        if r.returncode == 0:
            break
        stop_own_processes(*markers, wait_s=5)
    if r.returncode != 0:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"gcs": f"127.0.0.1:{gcs}", "address": f"http://127.0.0.1:{dash}", "temp_dir": temp_dir,
            "markers": markers}


def sample(out: Path) -> dict:
    """Nodes by type, teacher actors alive, rows done (Parquet parts written so far)."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    gen = [n for n in nodes if n["Resources"].get("generation")]
    actors = [a for a in ray._private.state.actors().values()
              if a["State"] == "ALIVE" and "MapWorker" in a.get("ActorClassName", "")]
    rows = 0
    if (out / "parts").is_dir():
        import pyarrow.parquet as pq

        for f in (out / "parts").glob("*.parquet"):
            try:
                rows += pq.read_metadata(f).num_rows
            except Exception:  # noqa: BLE001 - a part being written
                pass
    return {"head": len(nodes) - len(gen), "cpu_generation": len(gen), "gen_node_ids": [n["NodeID"] for n in gen],
            "actors": len(actors), "actor_nodes": [a["Address"]["NodeID"] for a in actors], "rows": rows}


def submit(head: dict, ts, out: Path, key: str) -> str:
    env = {**os.environ, "OPENAI_API_KEY": key}
    r = subprocess.run([str(BIN / "subq"), "submit", "generate", "--address", head["address"], "--",
                        "--input", "gsm8k:test", "--limit", str(N), "--output", str(out), "--base-url", ts.base_url,
                        "--actors", "1,3", "--batch-size", "1", "--n-sets", "1", "--n-feedback", "1",
                        "--max-concurrency", "1", "--progress-interval-s", "5"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[0]


def exactly_once(out: Path) -> tuple[bool, int]:
    from subq.problems import load_problems
    from subq.schema import read_parquet

    ids = [row.problem_id for row in read_parquet(str(out / "parts"))]
    return sorted(ids) == sorted(p.problem_id for p in load_problems("gsm8k:test", N)), len(ids)


def kill_node(node_id: str) -> bool:
    """Kill the raylet of one fake node (its workers die with it), as a lost cloud instance. The fake provider
    starts each node's raylet with RAY_OVERRIDE_NODE_ID_FOR_TESTING=<its node id>."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if cmd and cmd[0].endswith("raylet") and \
                    p.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id:
                os.kill(p.info["pid"], signal.SIGKILL)
                return True
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return False


def scenario(tmp: Path) -> None:
    from tests.conftest import stop_own_processes
    import ray
    from ray.job_submission import JobSubmissionClient

    from pipelines.teacher_server import TeacherServer

    head = start_head(tmp)
    key = "sk-subq-test-" + secrets.token_hex(12)
    report = {}
    t0 = time.time()
    timeline = []

    def tick(out: Path, phase: str) -> dict:
        s = sample(out)
        timeline.append((round(time.time() - t0), phase, s["head"], s["cpu_generation"], s["actors"], s["rows"]))
        print(f"{timeline[-1][0]:>5}s {phase:<6} nodes head={s['head']} cpu_generation={s['cpu_generation']} "
              f"actors={s['actors']} rows={s['rows']}/{N}", flush=True)
        return s

    try:
        ray.init(address=head["gcs"], log_to_driver=False)
        client = JobSubmissionClient(head["address"],
                                     headers={"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"})

        def status(jid):
            return str(client.get_job_status(jid).value)

        with TeacherServer(api_key=key, latency_s=1.5, seed=5) as ts:
            # 1. grow, then shrink
            out = tmp / "grow"
            s = tick(out, "start")
            grow = {"generation_nodes_at_start": s["cpu_generation"]}
            jid = submit(head, ts, out, key)
            samples = []
            while status(jid) not in ("SUCCEEDED", "FAILED", "STOPPED") and time.time() - t0 < 900:
                samples.append(tick(out, "job1"))
                time.sleep(2)
            grow["status"] = status(jid)
            if grow["status"] != "SUCCEEDED":
                print(client.get_job_logs(jid)[-4000:])
            samples.append(tick(out, "job1"))
            grow["max_generation_nodes"] = max(x["cpu_generation"] for x in samples)
            grow["max_actors"] = max(x["actors"] for x in samples)
            grow["exactly_once"], grow["rows"] = exactly_once(out)
            report["grow"] = grow

            # 2. a generation node is lost mid-job (the second job starts on the nodes the first left idle, or
            # launches them again if the autoscaler has removed them already)
            out = tmp / "kill"
            kill = {"killed_node": None, "rows_at_kill": None}
            jid = submit(head, ts, out, key)
            while status(jid) not in ("SUCCEEDED", "FAILED", "STOPPED") and time.time() - t0 < 1300:
                s = tick(out, "job2")
                victims = [n for n in s["gen_node_ids"] if n in s["actor_nodes"]]
                if kill["killed_node"] is None and victims and s["rows"] >= 1:
                    if kill_node(victims[0]):
                        kill["killed_node"], kill["rows_at_kill"] = victims[0][:8], s["rows"]
                        print(f"killed generation node {victims[0][:8]} at rows={s['rows']}", flush=True)
                time.sleep(2)
            kill["status"] = status(jid)
            if kill["status"] != "SUCCEEDED":
                print(client.get_job_logs(jid)[-4000:])
            tick(out, "job2")
            kill["exactly_once"], kill["rows"] = exactly_once(out)
            report["kill"] = kill

            # 3. no job left: the idle generation nodes are removed
            deadline = time.time() + 240
            while time.time() < deadline:
                s = tick(out, "idle")
                if s["cpu_generation"] == 0:
                    break
                time.sleep(3)
            grow["generation_nodes_at_end"] = s["cpu_generation"]
            grow["teacher_401"] = ts.stats()["by_status"].get("401", 0)  # the key reached every node, both jobs
        print("\n| t (s) | phase | head nodes | cpu_generation nodes | teacher actors alive | rows done |")
        print("|---|---|---|---|---|---|")
        for i, row in enumerate(timeline):  # the samples where something changed
            if i == 0 or i == len(timeline) - 1 or row[1:] != timeline[i - 1][1:]:
                print("| " + " | ".join(str(x) for x in row) + " |")
        print("REPORT " + json.dumps(report), flush=True)
    finally:
        ray.shutdown()
        stop_own_processes(*head["markers"], wait_s=5)
        shutil.rmtree(head["temp_dir"], ignore_errors=True)


GPU_TYPES = {  # a head without GPUs; a GPU type scaled from 0 that advertises a logical GPU (no CUDA needed)
    "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
    "ray.worker.gpu": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 80 * 2 ** 20}, "node_config": {},
                       "min_workers": 0, "max_workers": 2},
}


def gpu_preflight_scenario(tmp: Path) -> None:
    from tests.conftest import stop_own_processes
    import ray

    from subq.errors import SubqError
    from subq.schema import write_parquet
    from tests.training.test_train import _rows
    from training.config import TrainConfig
    from training.init_model import create_tiny_model
    from training.preflight import check_cluster
    from training.train import preflight, run_train

    head = start_head(tmp, GPU_TYPES, max_workers=2, idle_minutes=5)
    model = create_tiny_model(str(tmp / "tiny"), n_layer=1, n_embd=32, vocab_size=400, max_texts=200)
    write_parquet(_rows(8), str(tmp / "rows.parquet"))
    base = dict(algo="bc", data=str(tmp / "rows.parquet"), model=str(model), use_gpu=True, num_workers=2,
                storage_path=str(tmp / "runs"), name="r", val_fraction=0, eval_problems=0)

    def gpu_nodes() -> list[str]:
        return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]

    report = {}
    try:
        ray.init(address=head["gcs"], log_to_driver=False)
        # 1. more workers than the GPU type's maximum: refused before anything starts (only the head is up)
        over = {"error": None}
        try:
            run_train({**base, "num_workers": 3})
        except SubqError as e:
            over["error"] = str(e)
        time.sleep(5)  # an autoscaler update would have launched a node by now
        over["gpu_nodes_after"] = len(gpu_nodes())
        over["run_dir_exists"] = (tmp / "runs" / "r").exists()
        report["over"] = over
        print("num_workers=3:", over, flush=True)
        # 2. two workers: the GPU nodes are launched and checked (a first try whose wait is too short fails
        # naming node_wait_s and withdraws its request)
        ok = {"error": None, "gpu_nodes_before": len(gpu_nodes())}
        cfg = TrainConfig(**base)
        preflight(cfg)
        short = {"error": None}
        try:
            check_cluster(cfg, wait_s=1)
        except SubqError as e:
            short["error"] = str(e)
        short["placement_groups_after"] = sum(1 for p in ray.util.placement_group_table().values()
                                              if p["state"] in ("PENDING", "CREATED"))
        report["short"] = short
        print("wait_s=1:", short, flush=True)
        try:
            res = check_cluster(cfg) or {}
        except SubqError as e:
            ok["error"], res = str(e), {}
        print("num_workers=2:", res, flush=True)
        ok["gpu_node_ids"] = gpu_nodes()
        ok["checked_node_ids"] = [n["node_id"] for n in res.get("nodes_checked", [])]
        ok["checks"] = res.get("checks", [])
        pgs = ray.util.placement_group_table().values()
        ok["pending_placement_groups_after"] = sum(1 for p in pgs if p["state"] in ("PENDING", "CREATED"))
        report["ok"] = ok
        print("REPORT " + json.dumps(report), flush=True)
    finally:
        ray.shutdown()
        stop_own_processes(*head["markers"], wait_s=5)
        shutil.rmtree(head["temp_dir"], ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1] == "--gpu-preflight":
        gpu_preflight_scenario(Path(sys.argv[2]))
    else:
        scenario(Path(sys.argv[1]))
