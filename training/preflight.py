"""Pre-flight of a training run against the Ray cluster it will run on: after Ray is up, before any worker starts.
Each failure is one `ConfigError` line naming the field (exit 2 from `subq train`); nothing has been started yet.

Checked, in this order (the cheap ones first):
1. `num_workers`: more workers than the cluster can ever provide (GPUs with --use-gpu, else CPUs), counting the
   autoscaler's maximum when the cluster has one. Ray Train V2 would otherwise wait for them forever.
2. bf16 asked explicitly (`bf16.enabled: true`) with --use-gpu while a GPU node's accelerator type has no bf16
   (Ray's `accelerator_type:<T>` node resource: V100, T4, P100, P4, K80 are pre-Ampere). "auto" is decided on
   each worker by `torch.cuda.is_bf16_supported()`.
3. `resume` with another world size: the latest checkpoint's ZeRO optimizer shards were written by N ranks.
4. `storage_path`: a local path on a multi-node cluster must be the same directory on every node that can host a
   worker (a shared mount): a marker file written here must be visible there. Otherwise use a URI (s3://, gs://).
5. `model` / `init_from`: a local model directory must be readable (config.json + weights) on every node that can
   host a worker (job packaging leaves *.safetensors behind; a head-only path fails on the workers). A URI
   (s3://, gs://, file://) is checked on the driver and copied to each node's local cache by `fetch_model`.

The node checks run one zero-CPU task per node, pinned with hard node affinity.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from subq import storage
from subq.errors import ConfigError
from training.config import TrainConfig, bf16_requested

NO_BF16_GPUS = ("V100", "T4", "P100", "P4", "K80", "M60")  # pre-Ampere: no bf16 (compute capability < 8.0)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_SHARD = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def check_cluster(cfg: TrainConfig) -> None:
    """Every cluster-dependent check (Ray must be initialised). Raises ConfigError on the first failure."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    hosts = worker_nodes(cfg, nodes)
    check_worker_count(cfg, nodes, hosts)
    check_bf16(cfg, hosts)
    check_resume_world_size(cfg)
    if len(nodes) > 1:
        check_storage_shared(cfg, hosts)
    check_model_on_nodes(cfg, hosts)


def worker_nodes(cfg: TrainConfig, nodes: list[dict]) -> list[dict]:
    """Alive nodes that can host at least one training worker."""
    def fits(n: dict) -> int:
        res = n.get("Resources") or {}
        k = int(res.get("CPU", 0) // cfg.cpus_per_worker)
        return min(k, int(res.get("GPU", 0))) if cfg.use_gpu else k

    return [n for n in nodes if fits(n) > 0]


def check_worker_count(cfg: TrainConfig, nodes: list[dict], hosts: list[dict]) -> None:
    kind = "GPU" if cfg.use_gpu else "CPU"
    per = 1 if cfg.use_gpu else cfg.cpus_per_worker
    now = sum(int((n["Resources"].get(kind, 0)) // per) for n in hosts)
    most = max(now, _autoscaler_max(kind) // per if _autoscaler_max(kind) else 0)
    if cfg.num_workers > most:
        have = f"{sum(n['Resources'].get(kind, 0) for n in nodes):g} {kind}s on {len(nodes)} node(s)"
        raise ConfigError(f"{cfg.num_workers} workers need {cfg.num_workers * per:g} {kind}s; the cluster has {have}"
                          + (" and its autoscaler cannot add more" if _autoscaler_max(kind) is not None else ""),
                          field="num_workers", hint=f"use --num-workers {max(1, int(most))} or fewer, or add nodes")


def _autoscaler_max(kind: str) -> int | None:
    """The most of a resource the autoscaler's node types can ever provide (None: no autoscaler config)."""
    try:
        from ray._private.state import state

        m = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler state on a plain `ray start` cluster
        return None
    return int(m.get(kind, 0)) if m else None


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
    from training.train import run_dir

    ckpt = latest_checkpoint(run_dir(cfg))
    n = checkpoint_world_size(ckpt) if ckpt else None
    if n is not None and n != cfg.num_workers:
        raise ConfigError(f"the checkpoint to resume ({Path(ckpt).name}) was written by {n} workers; --num-workers "
                          f"is {cfg.num_workers} (ZeRO shards cannot be re-split here)", field="num_workers",
                          hint=f"resume with --num-workers {n}")


def _on_nodes(fn, hosts: list[dict], *args) -> dict[str, object]:
    """fn(*args) once on every host node (zero CPUs, hard affinity): {node address: result}."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(fn)
    refs = {n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})": task.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(*args) for n in hosts}
    return dict(zip(refs, ray.get(list(refs.values()), timeout=120)))


def _exists(path: str) -> bool:
    return Path(path).exists()


def check_storage_shared(cfg: TrainConfig, hosts: list[dict]) -> None:
    if "://" in cfg.storage_path:
        return
    root = Path(cfg.storage_path)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / f".subq-shared-{secrets.token_hex(6)}"
    marker.write_text("subq storage check")
    try:
        seen = _on_nodes(_exists, hosts, str(marker))
    finally:
        marker.unlink(missing_ok=True)
    blind = [node for node, ok in seen.items() if not ok]
    if blind:
        raise ConfigError(f"local storage path {cfg.storage_path} is not shared: node {blind[0]} does not see it "
                          f"(a {len(seen)}-node cluster needs one storage all workers write to)",
                          field="storage_path", hint="use s3://..., gs://... or a path on a shared mount (NFS)")


def _model_files(path: str) -> str | None:
    """None if `path` is a loadable model directory here, else what is missing."""
    p = Path(path)
    if not (p / "config.json").is_file():
        return "config.json"
    if not any((p / w).is_file() for w in WEIGHT_FILES):
        return "weights (" + ", ".join(WEIGHT_FILES[::2]) + ")"
    return None


def fetch_model(location: str) -> str:
    """A model directory given as a URI (s3://, gs://, file://, ...) copied once to this node's local cache
    (a file lock keeps concurrent workers of a node to one copy); a local path is returned as it is."""
    if "://" not in location:
        return location
    import hashlib
    import shutil
    import tempfile

    import pyarrow.fs as pafs
    from filelock import FileLock

    dest = Path(tempfile.gettempdir()) / "subq-models" / hashlib.sha256(location.encode()).hexdigest()[:16]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if not (dest / ".subq-complete").exists():
            fs, path = storage.resolve(location)
            part = Path(str(dest) + ".part")
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir()  # copy_files creates only the sub-folders it lists, not the destination itself
            pafs.copy_files(path, str(part), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            (part / ".subq-complete").write_text(location)
            shutil.rmtree(dest, ignore_errors=True)
            part.rename(dest)
    return str(dest)


def check_model_on_nodes(cfg: TrainConfig, hosts: list[dict]) -> None:
    field = "init_from" if cfg.init_from else "model"
    path = cfg.init_from or cfg.model
    if "://" in path or not hosts:
        return
    if not Path(path).is_dir():
        return  # a hub id resolved from the local cache by from_pretrained; the driver's check covers it
    missing = {node: m for node, m in _on_nodes(_model_files, hosts, path).items() if m}
    if missing:
        node, what = next(iter(missing.items()))
        raise ConfigError(f"model {path} is not readable on node {node} (missing {what}); "
                          f"{len(missing)} of {len(hosts)} worker nodes lack it", field=field,
                          hint="put the model on shared storage or on every node (e.g. the cluster's file_mounts)")
