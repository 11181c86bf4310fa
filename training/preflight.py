"""Pre-flight of a training run against the Ray cluster it will run on: after Ray is up, before any worker starts.
Each failure is one `ConfigError` line naming the field (exit 2 from `subq train`); no worker has started yet.

Checked, in this order (the cheap ones first):
1. `num_workers`: more workers than the cluster can ever provide (GPUs with --use-gpu, else CPUs): the nodes up
   now, or the node types and maxima of the autoscaler's config (`autoscaler_config`: what the cluster's
   autoscaler runs with), whichever is more. Ray Train V2 would otherwise wait for them forever.
2. `resume` with another world size: the latest checkpoint's ZeRO optimizer shards were written by N ranks.
3. The nodes themselves: when the workers do not fit the nodes up now (GPU types at `min_workers: 0`), a
   placement group of the workers' bundles asks the autoscaler for them; pre-flight waits (saying so, at most
   `node_wait_s`) until the nodes are up, then removes it (Ray Train's own placement group follows at once).
4. bf16 asked explicitly (`bf16.enabled: true`) with --use-gpu while a GPU node's accelerator type has no bf16
   (Ray's `accelerator_type:<T>` node resource: V100, T4, P100, P4, K80 are pre-Ampere). "auto" is decided on
   each worker by `torch.cuda.is_bf16_supported()`.
5. On every node that can host a worker other than the driver's (one zero-CPU task each, hard node affinity):
   `storage_path` (a local path must be the same directory there: a marker file written here must be visible),
   `model` / `init_from` (a local model directory must be readable: config.json + weights; job packaging leaves
   *.safetensors behind) and `data` / `val_data` (a local path must hold the same data files, by name and size:
   each worker reads the rows itself). URIs (s3://, gs://, file://) are checked on the driver; a model URI is
   copied to each node's local cache by `fetch_model`.

`check_cluster` says on the terminal which nodes it checked, and returns it.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path
from typing import Optional

from subq import storage
from subq.errors import ConfigError
from training.config import TrainConfig, bf16_requested

NO_BF16_GPUS = ("V100", "T4", "P100", "P4", "K80", "M60")  # pre-Ampere: no bf16 (compute capability < 8.0)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_SHARD = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


DEFAULT_NODE_WAIT_S = 900.0  # cloud GPU nodes take minutes to boot


def check_cluster(cfg: TrainConfig, wait_s: Optional[float] = None) -> dict:
    """Every cluster-dependent check (Ray must be initialised). Raises ConfigError on the first failure.
    Returns {"nodes_checked": [{"node_id", "address", "gpus", "by"}], "checks": [node checks run], "waited_s",
    "autoscaler": where its config was read (None: none found)}."""
    import ray

    from subq import console

    wait_s = float(wait_s if wait_s is not None else getattr(cfg, "node_wait_s", DEFAULT_NODE_WAIT_S))
    nodes = _alive()
    fits_now = cfg.num_workers <= sum(_slots(cfg, n["Resources"]) for n in nodes)
    scaler, source = (None, None) if fits_now else autoscaler_config()  # read only when nodes must be added
    check_worker_count(cfg, nodes, worker_nodes(cfg, nodes), scaler, source)
    check_resume_world_size(cfg)
    pg, waited = _acquire_worker_nodes(cfg, nodes, scaler, wait_s)
    try:
        hosts = worker_nodes(cfg, _alive())
        check_bf16(cfg, hosts)
        here = ray.get_runtime_context().get_node_id()
        remote = [n for n in hosts if n["NodeID"] != here]
        checks = check_on_nodes(cfg, remote)
    finally:
        if pg is not None:
            ray.util.remove_placement_group(pg)
    checked = [{"node_id": n["NodeID"], "address": n["NodeManagerAddress"], "gpus": n["Resources"].get("GPU", 0),
                "by": "driver" if n["NodeID"] == here else "task"} for n in hosts]
    if remote:  # a one-node run (the driver's own node) has nothing to check beyond what the driver read
        console.echo(f"pre-flight: {', '.join(checks) or 'nothing local to check'} on {len(remote)} worker "
                     f"node(s): {', '.join(_label(n) for n in remote)}"
                     + (" (and this node, by the driver)" if len(remote) < len(hosts) else ""))
    return {"nodes_checked": [c for c in checked if c["by"] == "task"], "hosts": checked, "checks": checks,
            "waited_s": round(waited, 1), "autoscaler": source}


def _alive() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _label(n: dict) -> str:
    nid = n["NodeID"]
    return f"{n['NodeManagerAddress']} ({nid[:6]}..{nid[-6:]}, {n['Resources'].get('GPU', 0):g} GPU)"


def _slots(cfg: TrainConfig, res: dict) -> int:
    """Training workers one node with these resources can host."""
    k = int(res.get("CPU", 0) // cfg.cpus_per_worker)
    return min(k, int(res.get("GPU", 0))) if cfg.use_gpu else k


def worker_nodes(cfg: TrainConfig, nodes: list[dict]) -> list[dict]:
    """Alive nodes that can host at least one training worker."""
    return [n for n in nodes if _slots(cfg, n.get("Resources") or {}) > 0]


# ---------------------------------------------------------------- what the autoscaler can provide


def autoscaler_config() -> tuple[Optional[dict], Optional[str]]:
    """The autoscaling config the connected cluster's autoscaler runs with ({"available_node_types": {name:
    {"resources", "min_workers", "max_workers"}}, "head_node_type", "max_workers"}) and where it was read; (None,
    None) on a cluster without an autoscaler (`ray start` by hand, a local Ray). Ray 2.60 reports it nowhere a
    driver can ask (the GCS's ClusterConfig key is written by no open-source autoscaler), so it is read, in order:
    1. the GCS autoscaler state's ClusterConfig, where an autoscaler reports one;
    2. on the head node (a zero-CPU task there): the file the autoscaler monitor process runs with
       (`monitor.py --autoscaling-config=PATH`: `ray up`'s ~/ray_bootstrap_config.yaml, or `ray start --head
       --autoscaling-config`), matched to this cluster by its `--gcs-address`;
    3. on KubeRay (the autoscaler is a sidecar container): the RayCluster resource, turned into the same config by
       Ray's own KubeRay code, with the head pod's service account (RAY_CLUSTER_NAME + the pod's namespace)."""
    try:
        from ray._private.state import state

        cc = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - not reported
        cc = None
    if cc is not None and cc.node_group_configs:
        types = {g.name or f"group{i}": {"resources": dict(g.resources), "min_workers": int(g.min_count),
                                         "max_workers": int(g.max_count) if g.max_count >= 0 else 10 ** 6}
                 for i, g in enumerate(cc.node_group_configs)}
        return {"available_node_types": types}, "the GCS autoscaler state"
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = next((n for n in _alive() if "node:__internal_head__" in (n.get("Resources") or {})), None)
    if head is None:
        return None, None
    task = ray.remote(num_cpus=0, max_retries=0)(_head_autoscaling_config)
    try:
        got = ray.get(task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head["NodeID"], soft=False))
                      .remote(ray.get_runtime_context().gcs_address), timeout=120)
    except Exception:  # noqa: BLE001 - unreadable: treated as no autoscaler (nodes up now only)
        return None, None
    return got if got[0] else (None, None)


def _head_autoscaling_config(gcs_address: str) -> tuple[Optional[dict], Optional[str]]:
    """On the head node: the autoscaling config of the monitor serving `gcs_address` (see autoscaler_config)."""
    import psutil
    import yaml

    port = gcs_address.rsplit(":", 1)[-1]
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if not any(a.endswith("monitor.py") for a in cmd[:3]):
                continue
            args = dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
            for i, a in enumerate(cmd[:-1]):  # `--autoscaling-config PATH`
                if a == "--autoscaling-config":
                    args["autoscaling-config"] = cmd[i + 1]
            gcs = args.get("gcs-address", "")
            if gcs != gcs_address and gcs.rsplit(":", 1)[-1] != port:
                continue
            path = args.get("autoscaling-config")
            if not path:
                continue
            path = os.path.join(p.cwd(), os.path.expanduser(path))
            with open(path) as f:
                return yaml.safe_load(f), f"{path} (the head's autoscaler)"
        except (psutil.Error, OSError, ValueError, yaml.YAMLError):
            continue
    name = os.environ.get("RAY_CLUSTER_NAME")
    ns_file = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    if name and os.path.exists(ns_file):
        try:
            from ray.autoscaler._private.kuberay.autoscaling_config import AutoscalingConfigProducer

            with open(ns_file) as f:
                ns = f.read().strip()
            return AutoscalingConfigProducer(name, ns)(), f"RayCluster {ns}/{name} (KubeRay)"
        except Exception:  # noqa: BLE001 - no permission / no API server: no autoscaler config known
            pass
    return None, None


def autoscaler_capacity(cfg: TrainConfig, config: Optional[dict]) -> tuple[int, list[tuple[str, int, int]]]:
    """The most training workers the autoscaler's node types can ever host, and how: [(type, nodes, workers per
    node)] (the head type counts once; worker types up to their max_workers, within the cluster's max_workers)."""
    if not config:
        return 0, []
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    left = config.get("max_workers")
    left = 10 ** 6 if left is None else int(left)
    total, how = 0, []
    if head in types and _slots(cfg, types[head].get("resources") or {}) > 0:
        k = _slots(cfg, types[head]["resources"])
        total, how = k, [(head, 1, k)]
    workers = [(name, t) for name, t in types.items() if name != head]
    for name, t in sorted(workers, key=lambda x: -_slots(cfg, x[1].get("resources") or {})):
        k = _slots(cfg, t.get("resources") or {})
        n = min(int(t.get("max_workers", left)), left)
        if k > 0 and n > 0:
            total, left = total + n * k, left - n
            how.append((name, n, k))
    return total, how


def check_worker_count(cfg: TrainConfig, nodes: list[dict], hosts: list[dict], scaler: Optional[dict] = None,
                       source: Optional[str] = None) -> None:
    kind = "GPU" if cfg.use_gpu else "CPU"
    per = 1 if cfg.use_gpu else cfg.cpus_per_worker
    now = sum(_slots(cfg, n["Resources"]) for n in hosts)
    most, how = autoscaler_capacity(cfg, scaler)
    if cfg.num_workers <= max(now, most):
        return
    have = f"{sum(n['Resources'].get(kind, 0) for n in nodes):g} {kind}s on {len(nodes)} node(s) now"
    if scaler is not None:
        ways = "; ".join(f"{t}: max {n} node(s) x {k} worker(s)" for t, n, k in how) or f"no node type has a {kind}"
        msg = f"the autoscaler can provide at most {most} ({ways}; from {source}); {have}"
    else:
        msg = f"the cluster has {have} and no autoscaler config was found"
    raise ConfigError(f"{cfg.num_workers} workers need {cfg.num_workers * per:g} {kind}s ({per:g} each); {msg}",
                      field="num_workers", hint=f"use --num-workers {max(1, max(now, most))} or fewer, or "
                      f"raise max_workers of a node type with {kind}s")


def _acquire_worker_nodes(cfg: TrainConfig, nodes: list[dict], scaler: Optional[dict], wait_s: float):
    """When the workers do not fit the nodes up now: a placement group of their bundles (what Ray Train will ask
    for) makes the autoscaler launch the nodes; wait until it is placed, at most wait_s. Returns (the placement
    group to remove once the checks ran, or None; seconds waited)."""
    import ray
    from ray.util.placement_group import placement_group

    from subq import console

    now = sum(_slots(cfg, n["Resources"]) for n in worker_nodes(cfg, nodes))
    if cfg.num_workers <= now:
        return None, 0.0
    kind = "GPU" if cfg.use_gpu else "CPU"
    bundle = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    types = ", ".join(f"{t} (max {n})" for t, n, _ in autoscaler_capacity(cfg, scaler)[1]) or "?"
    pg = placement_group([dict(bundle) for _ in range(cfg.num_workers)], strategy="PACK",
                         name=f"subq-preflight-{cfg.name}-{secrets.token_hex(3)}")
    console.echo(f"pre-flight: {now} of {cfg.num_workers} {kind} workers fit the nodes up now; waiting up to "
                 f"{wait_s:g} s for the autoscaler to launch nodes of {types} (bundles {bundle})")
    t0 = time.monotonic()
    try:
        while True:
            left = wait_s - (time.monotonic() - t0)
            if left <= 0:
                up = worker_nodes(cfg, _alive())
                raise ConfigError(
                    f"the autoscaler did not provide {cfg.num_workers} {kind} workers within {wait_s:g} s (up now: "
                    f"{sum(_slots(cfg, n['Resources']) for n in up)} on {len(up)} node(s); node types {types})",
                    field="node_wait_s", hint="raise it, or check the autoscaler (`ray status`, its monitor log)")
            ready, _ = ray.wait([pg.ready()], timeout=min(30.0, left))
            if ready:
                break
            up = worker_nodes(cfg, _alive())
            console.echo(f"pre-flight: still waiting for {kind} nodes ({time.monotonic() - t0:.0f} s): "
                         f"{sum(_slots(cfg, n['Resources']) for n in up)} of {cfg.num_workers} worker slots up")
    except BaseException:
        ray.util.remove_placement_group(pg)
        raise
    waited = time.monotonic() - t0
    console.echo(f"pre-flight: the nodes are up after {waited:.0f} s")
    return pg, waited


def check_bf16(cfg: TrainConfig, hosts: list[dict]) -> None:
    if not cfg.use_gpu or bf16_requested(cfg) is not True:
        return
    for n in hosts:
        types = [k.split(":", 1)[1] for k in n["Resources"] if k.startswith("accelerator_type:")]
        bad = [t for t in types if t.upper() in NO_BF16_GPUS]
        if bad:
            raise ConfigError(f"bf16 is enabled but node {n['NodeManagerAddress']} has {bad[0]} GPUs, which have no "
                              "bf16 (compute capability < 8.0)", field="deepspeed.bf16.enabled",
                              hint='set it to "auto" (fp32 where bf16 is missing) or false')


def latest_checkpoint(run: str) -> str | None:
    """The newest Ray Train checkpoint_* directory of a run (names sort by time), or None."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(run)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    dirs = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path))
                  if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    if not dirs:
        return None
    return dirs[-1] if "://" not in run else run.split("://", 1)[0] + "://" + dirs[-1]


def checkpoint_world_size(ckpt: str) -> int | None:
    """How many data-parallel ranks wrote a DeepSpeed checkpoint (its ZeRO optimizer shards); None if not sharded."""
    ranks = {int(m.group(1)) for f in storage.list_files(storage.join(ckpt, "ds"))
             if (m := _SHARD.search(Path(f).name))}
    return len(ranks) or None


def check_resume_world_size(cfg: TrainConfig) -> None:
    if not cfg.resume:
        return
    from training.config import run_dir

    ckpt = latest_checkpoint(run_dir(cfg))
    n = checkpoint_world_size(ckpt) if ckpt else None
    if n is not None and n != cfg.num_workers:
        raise ConfigError(f"the checkpoint to resume ({Path(ckpt).name}) was written by {n} workers; --num-workers "
                          f"is {cfg.num_workers} (ZeRO shards cannot be re-split here)", field="num_workers",
                          hint=f"resume with --num-workers {n}")


def _on_nodes(fn, hosts: list[dict], *args) -> dict[str, object]:
    """fn(*args) once on every host node (zero CPUs, hard affinity): {node label: result}."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(fn)
    refs = {_label(n): task.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(*args) for n in hosts}
    return dict(zip(refs, ray.get(list(refs.values()), timeout=120)))


DATA_SUFFIXES = (".parquet", ".json", ".jsonl")


def _data_files(path: str) -> Optional[list[tuple[str, int]]]:
    """The data files at a local path as [(relative name, size)] (a file: [("", size)]); None if it is missing."""
    p = Path(path)
    if p.is_file():
        return [("", p.stat().st_size)]
    if not p.is_dir():
        return None
    return sorted((str(f.relative_to(p)), f.stat().st_size) for f in p.rglob("*")
                  if f.is_file() and f.suffix in DATA_SUFFIXES)


def _node_view(marker: Optional[str], model: Optional[str], data: dict[str, str]) -> dict:
    """On one node: does it see the storage marker, what the model directory lacks, its data files."""
    return {"storage_path": Path(marker).exists() if marker else None,
            "model": _model_files(model) if model else None,
            "data": {field: _data_files(path) for field, path in data.items()}}


def check_on_nodes(cfg: TrainConfig, hosts: list[dict]) -> list[str]:
    """storage_path, model/init_from, data/val_data against what every host node sees (one task each). Returns
    the checks run (nothing to check on a URI, or without hosts)."""
    if not hosts:
        return []
    model_field = "init_from" if cfg.init_from else "model"
    model = cfg.init_from or cfg.model
    model = model if "://" not in model and Path(model).is_dir() else None  # a hub id: the driver's check covers it
    data = {f: getattr(cfg, f) for f in ("data", "val_data") if getattr(cfg, f) and "://" not in getattr(cfg, f)}
    marker = None
    if "://" not in cfg.storage_path:
        root = Path(cfg.storage_path)
        root.mkdir(parents=True, exist_ok=True)
        marker = root / f".subq-shared-{secrets.token_hex(6)}"
        marker.write_text("subq storage check")
    try:
        seen = _on_nodes(_node_view, hosts, str(marker) if marker else None, model, data)
    finally:
        if marker:
            marker.unlink(missing_ok=True)
    blind = [node for node, v in seen.items() if v["storage_path"] is False]
    if blind:
        raise ConfigError(f"local storage path {cfg.storage_path} is not shared: node {blind[0]} does not see it "
                          f"(a {len(seen) + 1}-node cluster needs one storage all workers write to)",
                          field="storage_path", hint="use s3://..., gs://... or a path on a shared mount (NFS)")
    missing = {node: v["model"] for node, v in seen.items() if v["model"]}
    if missing:
        node, what = next(iter(missing.items()))
        raise ConfigError(f"model {model} is not readable on node {node} (missing {what}); "
                          f"{len(missing)} of {len(hosts)} worker nodes lack it", field=model_field,
                          hint="put the model on shared storage or on every node (e.g. the cluster's file_mounts)")
    for field, path in data.items():
        here = _data_files(path)
        for node, v in seen.items():
            there = v["data"][field]
            if there != here:
                what = "does not exist" if there is None else (
                    f"holds other data files ({len(there)} files, {sum(s for _, s in there)} bytes; here "
                    f"{len(here or [])} files, {sum(s for _, s in here or [])} bytes)")
                raise ConfigError(f"{path} {what} on node {node}: each worker reads the rows itself", field=field,
                                  hint="put the data on shared storage or a URI (s3://, gs://), or on every node")
    return (["storage_path"] if marker else []) + ([model_field] if model else []) + list(data)


def _model_files(path: str) -> str | None:
    """None if `path` is a loadable model directory here, else what is missing."""
    p = Path(path)
    if not (p / "config.json").is_file():
        return "config.json"
    if not any((p / w).is_file() for w in WEIGHT_FILES):
        return "weights (" + ", ".join(WEIGHT_FILES[::2]) + ")"
    return None


def _source_signature(fs, path: str) -> str:
    """What identifies a version of a model directory at a URI: every file's name, size and mtime (an upload sets
    the object's mtime: S3/GCS LastModified). pyarrow's FileInfo carries no ETag; size + mtime stand in for it."""
    import hashlib
    import json

    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted((i.path[len(path):], i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def fetch_model(location: str) -> str:
    """A model directory given as a URI (s3://, gs://, file://, ...) copied to this node's local cache (a file
    lock keeps concurrent workers of a node to one copy), and copied again when the source changed since (a file's
    size or mtime, see _source_signature: v2 uploaded over v1 is served as v2). A source that cannot be listed
    falls back to a complete cached copy. A local path is returned as it is."""
    if "://" not in location:
        return location
    import hashlib
    import json
    import shutil
    import tempfile

    import pyarrow.fs as pafs
    from filelock import FileLock

    dest = Path(tempfile.gettempdir()) / "subq-models" / hashlib.sha256(location.encode()).hexdigest()[:16]
    dest.parent.mkdir(parents=True, exist_ok=True)
    done = dest / ".subq-complete"
    with FileLock(str(dest) + ".lock"):
        fs, path = storage.resolve(location)
        try:
            sig = _source_signature(fs, path)
        except OSError:
            if done.exists():
                return str(dest)  # the source is unreachable now: the copy made earlier
            raise
        try:
            cached = json.loads(done.read_text()).get("signature") if done.exists() else None
        except ValueError:
            cached = None  # a copy from before signatures: copied again once
        if cached != sig:
            part = Path(str(dest) + ".part")
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir()  # copy_files creates only the sub-folders it lists, not the destination itself
            pafs.copy_files(path, str(part), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            (part / ".subq-complete").write_text(json.dumps({"location": location, "signature": sig}))
            shutil.rmtree(dest, ignore_errors=True)
            part.rename(dest)
    return str(dest)
