"""Where the shared limiter lives, on a real two-node Ray cluster (ray.cluster_utils.Cluster, in its own interpreter:
Ray's auth mode and token are cached per process): on the node of the driver that creates it, even when that node
is busy and Ray's default scheduling would put some of them on the other node. (On one node this cannot fail.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
N = 20  # limiters created: with Ray's default placement about 1 in 6 of them went to the idle worker node


def test_limiters_sit_on_the_creating_drivers_node_of_a_two_node_cluster(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    r = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    report = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("REPORT "))[7:])
    print(report)
    assert report["nodes"] == 2 and report["head_busy"], report
    assert report["on_driver_node"] == N, report  # every one of them, on the driver's (the head) node
    # the same creations without the pinning spread some to the worker: the check above can fail
    assert report["default_on_driver_node"] < N, report


def scenario() -> dict:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from actors.limiter import RateLimiter
    from actors.limiter_client import get_or_create_limiter

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        head = ray.get_runtime_context().get_node_id()

        @ray.remote(num_cpus=1)
        class Busy:  # the head's only CPU taken: Ray's default placement then looks elsewhere too
            def node(self):
                return ray.get_runtime_context().get_node_id()

        busy = Busy.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
        report = {"nodes": len([n for n in ray.nodes() if n["Alive"]]), "head_busy": ray.get(busy.node.remote()) == head}

        def node_of(actor) -> str:
            return ray._private.state.actors(actor._actor_id.hex())["Address"]["NodeID"]

        made = [get_or_create_limiter(f"subq-limiter:test-placement:{i}", rpm=60, detached=False, wait=False)
                for i in range(N)]
        ray.get([a.stats.remote() for a in made])
        report["on_driver_node"] = sum(node_of(a) == head for a in made)
        plain = [ray.remote(RateLimiter).options(num_cpus=0).remote(60) for _ in range(N)]  # no pinning
        ray.get([a.stats.remote() for a in plain])
        report["default_on_driver_node"] = sum(node_of(a) == head for a in plain)
        return report
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    print("REPORT " + json.dumps(scenario()))
