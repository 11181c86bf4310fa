"""ray_cluster.yaml (and its local variant) validate against the cluster-launcher schema shipped in `ray`;
auth token lookup order; runtime_env packaging keeps data/checkpoints and the key out."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from cluster import auth
from cluster.submit import EXCLUDES, build_runtime_env, load_secret, _secret_package
from subq.errors import SubqError

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


@pytest.mark.parametrize("path", ["ray_cluster.yaml", "cluster/ray_cluster.local.yaml"])
def test_cluster_yaml_validates_against_rays_schema(path):
    cfg = yaml.safe_load((ROOT / path).read_text())
    jsonschema.validate(cfg, json.loads(SCHEMA.read_text()))
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert any(t.get("max_workers", 0) > t.get("min_workers", 0) for t in types.values())  # autoscaling type


def test_cloud_yaml_has_cpu_autoscaling_and_gpu_types_and_token_on():
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    types = cfg["available_node_types"]
    assert types["cpu_generation"]["max_workers"] > types["cpu_generation"]["min_workers"]
    assert types["gpu_train_serve"]["resources"]["GPU"] >= 1
    assert any("cluster/install_node.sh cpu" in c for c in cfg["head_setup_commands"])
    for t, kind in (("cpu_generation", "cpu"), ("gpu_train_serve", "gpu")):
        assert any(f"cluster/install_node.sh {kind}" in c for c in types[t]["worker_setup_commands"])
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "~/.ray/auth_token" in cfg["file_mounts"]


def test_a_broken_cluster_yaml_is_rejected_by_the_schema():
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    cfg["available_node_types"]["cpu_generation"]["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, json.loads(SCHEMA.read_text()))


def test_token_lookup_order_and_never_shown(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth.find_token({}) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("tok-file\n")
    assert auth.find_token({}).value == "tok-file"
    other = tmp_path / "t"
    other.write_text("tok-path")
    assert auth.find_token({"RAY_AUTH_TOKEN_PATH": str(other)}).value == "tok-path"
    t = auth.find_token({"RAY_AUTH_TOKEN": "tok-env", "RAY_AUTH_TOKEN_PATH": str(other)})
    assert t.value == "tok-env" and "tok-env" not in repr(t)
    assert auth.auth_headers(t) == {"Authorization": "Bearer tok-env"}
    with pytest.raises(SubqError, match="RAY_AUTH_TOKEN_PATH"):
        auth.find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    msg = str(auth.explain(401, "http://h:8265", None))
    assert "RAY_AUTH_TOKEN" in msg and "auth_token" in msg and "ray get-auth-token" in msg
    assert "rejected" in str(auth.explain(403, "http://h:8265", t)) and "tok-env" not in str(auth.explain(403, "x", t))


def test_runtime_env_excludes_data_and_carries_key_only_as_a_package(tmp_path, monkeypatch):
    pkg = _secret_package("MY_KEY", "sk-secret-123")
    env = build_runtime_env(str(ROOT), secret_module=pkg)
    assert env["working_dir"] == str(ROOT) and "env_vars" not in env
    assert {"/data", "**/checkpoints", ".git"} <= set(env["excludes"]) and env["excludes"] == EXCLUDES
    assert "sk-secret-123" not in json.dumps(env)
    assert oct(Path(pkg, "key").stat().st_mode & 0o777) == "0o600"
    monkeypatch.syspath_prepend(str(Path(pkg).parent))
    monkeypatch.delenv("MY_KEY", raising=False)
    assert load_secret() == "MY_KEY"
    import os
    assert os.environ.pop("MY_KEY") == "sk-secret-123"
    import sys
    sys.modules.pop("subq_job_secret", None)
    with pytest.raises(SubqError, match="--working-dir"):
        build_runtime_env(str(tmp_path))


def test_submit_checks_target_and_key_not_in_args(monkeypatch, tmp_path):
    from cluster import submit as sub

    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SubqError, match="unknown target"):
        sub.submit("fly", [], address="http://127.0.0.1:9")
    monkeypatch.setenv("MY_KEY", "sk-abc")
    with pytest.raises(SubqError, match="appears in the job arguments") as e:
        sub.submit("generate", ["--api-key", "sk-abc"], address="http://127.0.0.1:9", key_env="MY_KEY")
    assert "sk-abc" not in str(e.value)
    with pytest.raises(SubqError, match="cannot reach a Ray dashboard"):
        sub.submit("generate", [], address="http://127.0.0.1:9", key_env="MY_KEY")


def test_driver_address_resolution_http_ray_address_never_reaches_ray_init(monkeypatch):
    """cluster.connect.resolve: a GCS / ray:// address is joined as given; an http(s) RAY_ADDRESS (the Jobs API)
    served by no Ray here starts a local Ray and says so; an http --ray-address is an error naming the flag."""
    from cluster import connect

    monkeypatch.setattr(connect, "local_gcs_for_dashboard", lambda url: None)
    t = connect.resolve(None, {"RAY_ADDRESS": "http://127.0.0.1:1"})
    assert t.address == "local" and not t.joining and "Jobs API" in t.note and "started a local Ray" in t.note
    t = connect.resolve(None, {"RAY_ADDRESS": "10.0.0.5:6379"})
    assert t.address == "10.0.0.5:6379" and t.joining and "GCS" in t.note
    t = connect.resolve("ray://h:10001", {"RAY_ADDRESS": "http://127.0.0.1:1"})
    assert t.address == "ray://h:10001" and t.joining and "--ray-address" in t.note
    assert connect.resolve(None, {"RAY_ADDRESS": "local"}).address == "local"
    with pytest.raises(SubqError, match="--ray-address") as e:
        connect.resolve("https://head:8265", {})
    assert "subq submit" in (e.value.hint or "")
    monkeypatch.setattr(connect, "local_gcs_for_dashboard", lambda url: "127.0.0.1:6390")
    t = connect.resolve(None, {"RAY_ADDRESS": "http://127.0.0.1:8265"})
    assert t.address == "127.0.0.1:6390" and t.joining and t.explicit_local and "joined it" in t.note


def test_jobs_api_address_the_way_rays_sdk_finds_it(monkeypatch):
    from cluster.jobs import DEFAULT_ADDRESS, resolve_address

    assert resolve_address(None, {}) == DEFAULT_ADDRESS
    assert resolve_address(None, {"RAY_ADDRESS": "http://h:8265/"}) == "http://h:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "http://h:8265", "RAY_API_SERVER_ADDRESS": "https://a:443"}) \
        == "https://a:443"
    assert resolve_address("h2:8265", {"RAY_API_SERVER_ADDRESS": "https://a:443"}) == "http://h2:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "local"}) == DEFAULT_ADDRESS


def test_submit_options_runtime_env_merge_and_key_refused(tmp_path):
    from cluster.submit import _parse_resources, load_runtime_env

    f = tmp_path / "renv.yaml"
    f.write_text("env_vars: {SUBQ_X: '1'}\npip: [tqdm]\npy_modules: [/opt/mod]\nexcludes: ['*.csv']\n")
    user = load_runtime_env(str(f))
    assert load_runtime_env('{"env_vars": {"SUBQ_X": "1"}}') == {"env_vars": {"SUBQ_X": "1"}}
    env = build_runtime_env(str(ROOT), secret_module="/tmp/pkg/subq_job_secret", user=user, key_env="K",
                            key_value="sk-zzz")
    assert env["env_vars"] == {"SUBQ_X": "1"} and env["pip"] == ["tqdm"] and "*.csv" in env["excludes"]
    assert env["py_modules"] == ["/opt/mod", "/tmp/pkg/subq_job_secret"] and env["working_dir"] == str(ROOT)
    for bad in ({"env_vars": {"K": "x"}}, {"env_vars": {"OTHER": "sk-zzz"}}, {"working_dir": "/x"}):
        with pytest.raises(SubqError, match="--runtime-env"):
            build_runtime_env(str(ROOT), user=bad, key_env="K", key_value="sk-zzz")
    for bad in ("[1]", str(tmp_path / "missing.yaml"), "{not json"):
        with pytest.raises(SubqError, match="--runtime-env"):
            load_runtime_env(bad)
    assert _parse_resources('{"generation": 1}') == {"generation": 1}
    with pytest.raises(SubqError, match="--entrypoint-resources"):
        _parse_resources("generation=1")


def _ray_start_env(cmd: str) -> dict:
    """NAME=value words before `ray start` in a cluster-launcher start command."""
    words = cmd.split("ray start")[0].replace("&&", " ").split()
    return dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))


def test_gpu_node_type_can_run_gpus():
    """issue 16 (3): a GPU image with drivers (documented how to find its id), a disk for CUDA wheels +
    checkpoints, NCCL settings for the instance family, the CUDA torch wheel on that type only."""
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    text = (ROOT / "ray_cluster.yaml").read_text()
    gpu = cfg["available_node_types"]["gpu_train_serve"]
    assert gpu["node_config"]["InstanceType"].startswith("g5.")
    assert "/aws/service/deeplearning/ami/" in text and "nvidia-driver" in text  # how to get the DLAMI id
    disk = gpu["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"]
    assert disk >= 200
    setup = " ".join(gpu["worker_setup_commands"])
    assert "install_node.sh gpu" in setup and "nvidia-smi" in setup and gpu["docker"]["worker_image"].endswith("-gpu")
    script = (ROOT / "cluster" / "install_node.sh").read_text()  # CPU wheel index on cpu, PyPI's CUDA build on gpu
    assert "download.pytorch.org/whl/cpu" in script and '"torch==' in (ROOT / "pyproject.toml").read_text()
    env = _ray_start_env(next(c for c in cfg["worker_start_ray_commands"] if "ray start" in c))
    assert env.get("NCCL_SOCKET_IFNAME") == "^docker0,lo" and env.get("NCCL_IB_DISABLE") == "1"


def test_cluster_yaml_and_code_request_the_same_resources():
    """Teacher actors request what the cpu_generation type advertises (and the head does not, so the autoscaler
    adds that type for them; every `ray start` names it in SUBQ_AUTOSCALED_RESOURCES); Ray Train workers with
    --use-gpu and GPU Serve decomposer replicas request only what the GPU type advertises, and fit one node."""
    from pipelines.generate import GenerateConfig
    from pipelines.serve import ServeConfig, build_app
    from training.config import TrainConfig

    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    types = cfg["available_node_types"]
    head, gen_t, gpu_t = types[cfg["head_node_type"]]["resources"], types["cpu_generation"]["resources"], \
        types["gpu_train_serve"]["resources"]

    def fits(request: dict, offer: dict) -> bool:
        return all(offer.get(k, 0) >= v for k, v in request.items() if v)

    g = GenerateConfig(input="gsm8k:test", output="/tmp/x")
    actor = {"CPU": g.actor_num_cpus, **g.actor_resources}
    assert g.actor_resources and fits(actor, gen_t) and not fits(actor, head)
    per_node = min(gen_t[k] / v for k, v in actor.items())
    assert per_node >= 8  # many I/O-bound teacher actors per generation node
    for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in c:
            assert set(g.actor_resources) <= set(_ray_start_env(c)["SUBQ_AUTOSCALED_RESOURCES"].split(","))

    from training.train import scaling_config

    # what run_train itself gives TorchTrainer for a default --use-gpu run (not a copy of it)
    worker = scaling_config(TrainConfig(data="x", model="m", use_gpu=True))._resources_per_worker_not_none
    assert set(worker) <= set(gpu_t) and fits(worker, gpu_t) and worker.get("GPU") == 1

    app = build_app(ServeConfig(decomposer={"path": "/models/bc/final"}, decomposer_num_gpus=1))
    dec = app._bound_deployment.init_args[0]._bound_deployment.ray_actor_options
    request = {"CPU": dec.get("num_cpus", 1), "GPU": dec.get("num_gpus", 0), **(dec.get("resources") or {})}
    assert request["GPU"] == 1 and fits(request, gpu_t) and not fits(request, gen_t)


def _effective_commands(cfg: dict) -> dict:
    """Per node type, the setup commands Ray 2.60 runs there: prepare_config merges the global setup_commands into
    head/worker_setup_commands; the autoscaler's per-node-type lookup (StandardAutoscaler
    ._get_node_type_specific_fields) then lets a type's own worker_setup_commands replace them."""
    import copy
    from types import SimpleNamespace

    from ray.autoscaler._private.autoscaler import StandardAutoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config
    from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    out = {}
    for name in prepared["available_node_types"]:
        if name == prepared["head_node_type"]:
            out[name] = list(prepared["head_setup_commands"])
            continue
        shim = SimpleNamespace(config=prepared, available_node_types=prepared["available_node_types"],
                               provider=SimpleNamespace(node_tags=lambda nid, t=name: {TAG_RAY_USER_NODE_TYPE: t}))
        out[name] = list(StandardAutoscaler._get_node_type_specific_fields(shim, "n", "worker_setup_commands"))
    return out


def test_every_node_type_runs_the_one_install_and_the_head_gets_boto3():
    """issue 23 (1, 2): read with Ray's own merge rules, every node type's effective setup installs the project
    (cluster/install_node.sh, whose `pip install -e` pins Ray through pyproject.toml) for its kind; the head's
    also installs boto3 (the AWS node provider), which Ray's default head setup did and ours replaces."""
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    eff = _effective_commands(cfg)
    kinds = {"head": "cpu", "cpu_generation": "cpu", "gpu_train_serve": "gpu"}
    for name, cmds in eff.items():
        text = "\n".join(cmds)
        assert f"cluster/install_node.sh {kinds[name]}" in text, (name, cmds)
    assert any("boto3" in c and "pip install" in c for c in eff[cfg["head_node_type"]]), eff["head"]
