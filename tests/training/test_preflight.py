"""Training pre-flight on a real local multi-node Ray (issue 16): a `ray start --head` with no GPUs and two
`ray start` worker nodes declaring logical GPUs (`--num-gpus 2`, accelerator types A100 and T4), token auth on,
own temp dir and free ports. Each worker node runs in its own mount namespace (`unshare -m`) where a tmpfs hides
one directory of the head's disk: what lives there exists on the head only, as on a real cluster.

Refused before any worker starts, one line each: a local storage path the workers do not see, a model or `--data`
present only on the head, more workers than GPUs, bf16 on a T4, resume with another world size. A valid config
passes, its checks run on both GPU nodes.
"""

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

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="per-node filesystems need `unshare -m` as root")
def test_preflight_on_local_multinode_cluster(tmp_path):
    """In its own interpreter: token auth is process-global in Ray."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "NCCL_SOCKET_IFNAME")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=900)
    print(r.stdout[-3000:])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "SCENARIO OK" in r.stdout


def test_worker_maximum_comes_from_the_autoscalers_node_types_not_the_gpus_up_now():
    """A KubeRay RayCluster (GPU group min 0 max 2, 1 GPU a pod; head without GPU) through Ray's own KubeRay
    config derivation, and a cluster-launcher config: the most GPU workers is max nodes x GPUs per node, counted
    while no GPU node is up; beyond it the error names the maximum and the node type (no Ray needed)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    from subq.errors import ConfigError
    from training.config import TrainConfig
    from training.preflight import autoscaler_capacity, check_worker_count

    def group(name, start, limits, lo=0, hi=2):
        return {"groupName": name, "minReplicas": lo, "maxReplicas": hi, "rayStartParams": start,
                "template": {"spec": {"containers": [{"name": "ray", "resources": {"limits": limits}}]}}}

    head = group("head", {"num-cpus": "2"}, {"cpu": "2", "memory": "8Gi"})
    cr = {"metadata": {"name": "subq", "namespace": "ml"},
          "spec": {"headGroupSpec": {k: v for k, v in head.items() if k not in ("groupName", "minReplicas", "maxReplicas")},
                   "workerGroupSpecs": [group("gpu", {}, {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}),
                                        group("cpu", {}, {"cpu": "4", "memory": "8Gi"}, hi=5)]}}
    kuberay = _derive_autoscaling_config_from_ray_cr(cr)
    launcher = {"head_node_type": "h", "max_workers": 10, "available_node_types": {
        "h": {"resources": {"CPU": 4}, "max_workers": 0},
        "gpu": {"resources": {"CPU": 8, "GPU": 1}, "min_workers": 0, "max_workers": 2},
        "cpu": {"resources": {"CPU": 4}, "min_workers": 0, "max_workers": 5}}}
    head_only = [{"NodeID": "h", "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 2.0}}]
    for config in (kuberay, launcher):
        gpu = TrainConfig(data="d", model="m", use_gpu=True, num_workers=2)
        assert autoscaler_capacity(gpu, config) == (2, [("gpu", 2, 1)])
        check_worker_count(gpu, head_only, [], config, "test")  # 2 fit: no error while no GPU node is up
        with pytest.raises(ConfigError) as e:
            check_worker_count(gpu.model_copy(update={"num_workers": 3}), head_only, [], config, "test")
        assert "field 'num_workers'" in str(e.value) and "at most 2" in str(e.value) and "gpu: max 2" in str(e.value)
    cpu = TrainConfig(data="d", model="m", num_workers=4, cpus_per_worker=2)
    assert autoscaler_capacity(cpu, launcher)[0] == 2 + 2 * 4 + 5 * 2  # head + GPU nodes' CPUs + CPU nodes
    assert autoscaler_capacity(cpu, {**launcher, "max_workers": 3})[0] == 2 + 2 * 4 + 1 * 2  # cluster max_workers
    with pytest.raises(ConfigError, match="no autoscaler config"):
        check_worker_count(TrainConfig(data="d", model="m", use_gpu=True), head_only, [], None, None)


def test_serve_decomposer_device_follows_its_gpus():
    from pipelines.serve import ServeConfig

    gpu = ServeConfig(decomposer={"path": "m"}, decomposer_num_gpus=1)
    assert gpu.decomposer.device == "cuda"  # a reserved GPU is used
    assert ServeConfig(decomposer={"path": "m"}).decomposer.device == "cpu"
    with pytest.raises(ValueError, match="Ray reserves no GPU"):
        ServeConfig(decomposer={"path": "m", "device": "cuda"})  # a GPU used that Ray never reserved
    with pytest.raises(ValueError, match="left idle"):
        ServeConfig(decomposer={"path": "m", "device": "cpu"}, decomposer_num_gpus=1)


def test_fetch_model_copies_a_flat_model_directory_given_as_a_uri(tmp_path, monkeypatch):
    """A model directory with no sub-folders (a tiny model, most hub snapshots) given as file://: pyarrow's
    copy_files creates only the sub-folders it lists, so the destination must exist before the copy."""
    from training.preflight import fetch_model

    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "tokenizer.json").write_text("{}")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile as _tf

    monkeypatch.setattr(_tf, "tempdir", None)
    got = Path(fetch_model(f"file://{src}"))
    assert got.is_relative_to(tmp_path / "tmp")
    assert sorted(p.name for p in got.iterdir()) == [".subq-complete", "config.json", "tokenizer.json"]
    assert fetch_model(f"file://{src}") == str(got)  # copied once; a second call re-uses it
    assert fetch_model(str(src)) == str(src)  # a local path is used as it is


def test_fetch_model_refreshes_the_cached_copy_when_the_source_changes(tmp_path, monkeypatch):
    """v1 fetched, then v2 uploaded to the same URI: the next fetch_model serves v2 (the source's sizes/mtimes
    changed), not the stale cached v1; an unchanged source is not copied again."""
    import tempfile as _tf

    from training.preflight import fetch_model

    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text('{"v": 1}')
    (src / "model.safetensors").write_text("v1-weights")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(_tf, "tempdir", None)
    uri = f"file://{src}"
    got = Path(fetch_model(uri))
    assert (got / "model.safetensors").read_text() == "v1-weights"
    (got / "sentinel").write_text("")  # gone if the copy is redone
    assert Path(fetch_model(uri)) == got and (got / "sentinel").exists()  # unchanged source: the cached copy
    (src / "model.safetensors").write_text("v2-weights, longer")  # v2 uploaded: size and mtime change
    assert (Path(fetch_model(uri)) / "model.safetensors").read_text() == "v2-weights, longer"
    (src / "config.json").write_text('{"v": 3}')  # same size, later mtime (an upload sets it)
    st = (src / "config.json").stat()
    os.utime(src / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert json.loads((Path(fetch_model(uri)) / "config.json").read_text()) == {"v": 3}


def test_a_run_directory_given_as_a_uri_is_served_from_its_best_copied_once(tmp_path, monkeypatch):
    """`--decomposer-path s3://.../runs/x` (here file://): the checkpoint a local run directory would give (best/,
    else final/) is copied to the node's cache and loaded from there; only that folder is copied."""
    import tempfile as _tf

    import torch

    from training.decomposer import load_decomposer
    from training.init_model import create_tiny_model

    run = tmp_path / "runs" / "x"
    create_tiny_model(str(run / "final"), n_layer=1, n_embd=32, seed=1, max_texts=200)
    create_tiny_model(str(run / "best"), n_layer=1, n_embd=32, seed=2, max_texts=200)
    (run / "checkpoint_000001").mkdir()
    (run / "checkpoint_000001" / "big.bin").write_bytes(b"0" * 1000)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(_tf, "tempdir", None)
    d = load_decomposer(f"file://{run}")
    assert Path(d.path).is_relative_to(tmp_path / "tmp") and not list((tmp_path / "tmp").rglob("big.bin"))
    best = load_decomposer(str(run / "best"))
    for a, b in zip(d.model.state_dict().values(), best.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(Exception, match="no model there"):
        load_decomposer(f"file://{tmp_path / 'runs'}")


def _ports() -> list[str]:
    from tests.conftest import free_port

    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}"]


def _common(temp_dir: str, store_mb: int = 80) -> list[str]:
    return ["--disable-usage-stats", f"--object-store-memory={store_mb * 1024 ** 2}", f"--temp-dir={temp_dir}"]


def start_head(temp_dir: str, num_cpus: int, num_gpus: int = 0, store_mb: int = 80, env: dict | None = None) -> str:
    """A `ray start --head` of its own (temp dir, free ports, no dashboard); returns its GCS address. Stop it with
    `stop_cluster(temp_dir)`; wait for the node with `wait_nodes`."""
    from tests.conftest import free_port

    port = free_port()
    head = [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
            "--include-dashboard=false", f"--ray-client-server-port={free_port()}", *_ports(),
            *_common(temp_dir, store_mb)]
    _ray_start(head, {**_env(), **(env or {})})
    return f"127.0.0.1:{port}"


def wait_nodes(n: int, timeout_s: float = 300) -> None:
    import ray

    deadline = time.time() + timeout_s
    while len([x for x in ray.nodes() if x["Alive"]]) < n and time.time() < deadline:
        time.sleep(2)
    assert len([x for x in ray.nodes() if x["Alive"]]) >= n, ray.nodes()


def _env() -> dict:
    return {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}


def connect(address: str, **kw) -> None:
    """ray.init(address), retried while the head's raylet has not registered yet (late on a loaded machine)."""
    import ray

    deadline = time.time() + 300
    while True:
        try:
            ray.init(address=address, log_to_driver=False, **kw)
            return
        except (ConnectionError, RuntimeError):
            ray.shutdown()
            if time.time() > deadline:
                raise
            time.sleep(5)


def _start_cluster(temp_dir: str, hidden: Path) -> str:
    env, common, ports = _env(), _common(temp_dir), _ports
    address = start_head(temp_dir, num_cpus=1)
    connect(address)  # the head is registered before workers join it
    for gpu in ("A100", "T4"):
        worker = [str(BIN / "ray"), "start", f"--address={address}", "--num-cpus=1", "--num-gpus=2",
                  f"--resources={json.dumps({f'accelerator_type:{gpu}': 1})}", *ports(), *common]
        # this node's view of the disk: `hidden` is an empty tmpfs (the raylet and its workers inherit it)
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
               f'mount -t tmpfs tmpfs "{hidden}" && exec "$@"', "sh", *worker]
        _ray_start(cmd, env)
    return address


def _ray_start(cmd: list[str], env: dict) -> None:
    """`ray start`. On a loaded machine its fixed 30 s wait for the raylet to register can pass while the raylet
    (already running) registers later: that is not a failure; the scenario waits for the nodes to show up."""
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 or "timed out during startup" in r.stderr, r.stderr[-3000:]


def stop_cluster(temp_dir: str) -> None:
    from tests.conftest import stop_own_processes

    stop_own_processes(temp_dir)


def scenario(tmp: Path) -> None:
    import ray

    from subq.errors import ConfigError
    from subq.schema import write_parquet
    from tests.training.test_train import _rows
    from training.config import PRESETS, TrainConfig
    from training.init_model import create_tiny_model
    from training.preflight import check_cluster
    from training.train import run_train

    hidden, shared = tmp / "head-only", tmp / "shared"
    hidden.mkdir()
    shared.mkdir()
    head_model = create_tiny_model(str(hidden / "tiny"), n_layer=1, n_embd=32, vocab_size=400, max_texts=200)
    model = shutil.copytree(head_model, shared / "tiny")
    write_parquet(_rows(8), str(shared / "rows.parquet"))
    write_parquet(_rows(8), str(hidden / "rows.parquet"))  # data the workers cannot read
    bf16 = json.loads(PRESETS["zero2"].read_text())
    bf16["bf16"] = {"enabled": True}
    (shared / "bf16.json").write_text(json.dumps(bf16))
    # a run to resume whose last checkpoint was written by 2 ranks (DeepSpeed's shard names)
    ds = shared / "runs" / "old" / "checkpoint_2026-01-01_00-00-00.000000" / "ds"
    ds.mkdir(parents=True)
    (ds.parent.parent / "metrics.json").write_text("[]")
    for r in (0, 1):
        (ds / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")

    temp_dir = tempfile.mkdtemp(prefix="rpf", dir="/tmp")  # short: AF_UNIX socket paths
    try:
        _start_cluster(temp_dir, hidden)
        wait_nodes(3)
        assert sum(n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]) == 4, ray.nodes()
        base = dict(algo="bc", data=str(shared / "rows.parquet"), model=str(model), use_gpu=True, num_workers=2,
                    storage_path=str(shared / "runs"), name="r", val_fraction=0, eval_problems=0)
        cases = [
            (dict(storage_path=str(hidden / "runs")), "field 'storage_path'", "is not shared"),
            (dict(model=str(head_model)), "field 'model'", "not readable on node"),
            (dict(data=str(hidden / "rows.parquet")), "field 'data'", "does not exist on node"),
            (dict(num_workers=5), "field 'num_workers'", "4 GPUs"),
            (dict(deepspeed=str(shared / "bf16.json")), "field 'deepspeed.bf16.enabled'", "T4"),
            (dict(name="old", resume=True, num_workers=1), "field 'num_workers'", "written by 2 workers"),
        ]
        for overrides, field, needle in cases:
            with pytest.raises(ConfigError) as e:
                run_train({**base, **overrides})
            msg = str(e.value)
            assert field in msg and needle in msg and "\n" not in msg, msg
            print("refused:", msg)
        rep = check_cluster(TrainConfig(**base))  # the same run with a shared model, data and storage passes
        assert len(rep["nodes_checked"]) == 2 and rep["checks"] == ["storage_path", "model", "data"], rep
        assert not (shared / "runs" / "r").exists() and not (hidden / "runs" / "r").exists()  # nothing started
        _serve_deploy_keeps_num_gpus(model)
        print("SCENARIO OK")
    finally:
        ray.shutdown()
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _serve_deploy_keeps_num_gpus(model: str) -> None:
    """The shipped serve_config.yaml through Serve's deploy path (what `serve deploy` makes the dashboard do:
    ServeDeploySchema -> deploy_apps) with `decomposer_num_gpus: 1`: the Decomposer deployment Serve reports
    reserves that GPU (the YAML's `deployments` entry no longer replaces the code's ray_actor_options)."""
    import time

    import yaml
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    from tests.conftest import free_port

    raw = yaml.safe_load((ROOT / "pipelines" / "serve_config.yaml").read_text())
    raw["http_options"]["port"] = free_port()
    args = raw["applications"][0]["args"]
    args["decomposer_num_gpus"] = 1
    args["decomposer"]["path"] = str(model)
    args["solver"]["base_url"] = f"http://127.0.0.1:{free_port()}/v1"
    config = ServeDeploySchema.model_validate(raw)
    client = serve_api.serve_start(http_options=config.http_options.model_dump(),
                                   proxy_location=config.proxy_location)
    try:
        client.deploy_apps(config, _blocking=False)
        opts, deadline = None, time.time() + 240
        while opts is None and time.time() < deadline:
            deps = (client.get_serve_details().get("applications") or {}).get("subq", {}).get("deployments") or {}
            if "Decomposer" in deps:
                opts = deps["Decomposer"]["deployment_config"]["ray_actor_options"]
            time.sleep(1)
        assert opts is not None, client.get_serve_details()
        print("serve: Decomposer ray_actor_options", opts)
        assert opts.get("num_gpus") == 1 and opts.get("num_cpus") == 1, opts
    finally:
        serve.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    scenario(Path(sys.argv[1]))
