"""Train a decomposer: BC, Filtered BC or ILQL (sparse/dense rewards) with Ray Train's TorchTrainer running a
DeepSpeed engine on every worker (CPU and GPU alike; no separate DDP path).

    subq init-model models/tiny
    subq train --algo bc --data subq/data/gsm8k-ai-subq/qg_test_dataset.jsonl --model models/tiny \\
        --steps 200 --batch-size 8 --num-workers 2 --deepspeed zero2 --storage-path runs --name bc
    subq train --algo ilql --rewards sparse --data gen/out/rows.parquet --model models/tiny \\
        --init-from runs/bc/final --name ilql --num-workers 2
    subq train --config job.yaml --resume                      # continue runs/<name> from its last checkpoint
    python -m training.train --config job.yaml --num-workers 2   # the same, as a Ray job entry point:
    ray job submit --working-dir . -- python -m training.train --config job.yaml --use-gpu --num-workers 8 \\
        --deepspeed zero3 --storage-path s3://bucket/runs

Order of operations: (1) validate config, model and data on the driver before anything starts; (2) TorchTrainer
with ScalingConfig(num_workers, use_gpu), RunConfig(storage_path, name, FailureConfig, CheckpointConfig);
(3) per worker: DS_ACCELERATOR=cpu + gloo (CPU) or cuda + NCCL (GPU; interface `^docker0,lo` unless set), tokenize,
precision (bf16 only on native bf16) and ZeRO stage (`auto`: training.config.choose_zero_stage), `deepspeed.initialize`
(every start-up stage under `startup_timeout_s`), resume from `ray.train.get_checkpoint()` if any, then a flat loop: forward, loss (training.bc / training.ilql),
engine.backward, engine.step, Polyak sync of the ILQL target heads, periodic metrics + DeepSpeed checkpoints
reported with `ray.train.report`, validation split across the ranks, best/ written by a helper thread; (4) final:
the fp32 master weights gathered from the optimizer's shards (every ZeRO stage; never the bf16 compute copy; a
frozen policy: its original fp32 weights) and saved by rank 0 in HF format.
Host syncs: the loop reads device values once per logging step; metrics files are written by a helper thread.

Outputs under <storage_path>/<name>/: Ray Train's checkpoint_* dirs, metrics.json, metrics.csv, metrics.png
and final/ (config.json, model.safetensors, tokenizer files, training_config.yaml, and for ILQL
ilql_heads.safetensors). final/ loads with AutoModelForCausalLM and with training.decomposer.load_decomposer.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from subq import storage
from subq.errors import ConfigError
from training.config import TrainConfig, deepspeed_config, run_dir
from training.train.loop import FAULT_ENV, train_loop
from training.train.metrics import overfitting_note
from training.train.runtime import network_env

# the parts (training.train.loop: the per-worker loop; .checkpoints; .metrics; .runtime: timed start-up stages and
# network defaults); this module is the driver: pre-flight, the TorchTrainer, progress, the run's summary


# ---------------------------------------------------------------- driver


def resolve_models(cfg: TrainConfig) -> TrainConfig:
    """model / init_from -> local directories (GGUF converted once), or a hub id only when allowed
    (training.student.resolve_model: no network attempt for a path that does not exist)."""
    from training.student import resolve_model

    upd = {k: resolve_model(getattr(cfg, k), k) for k in ("model", "init_from") if getattr(cfg, k)}
    return cfg.model_copy(update=upd)


def preflight(cfg: TrainConfig) -> dict:
    """Every check that can fail on user input, before Ray or any worker starts. Returns data counts."""
    from transformers import AutoConfig

    from training.data import read_training_rows, select_examples, split_problems

    base = cfg.init_from or cfg.model
    field = "init_from" if cfg.init_from else "model"
    if "://" in base:  # copied to each node's local cache by the workers (training.preflight.fetch_model)
        if not storage.exists(storage.join(base, "config.json")):
            raise ConfigError(f"no config.json under {base}", field=field)
    else:
        try:
            AutoConfig.from_pretrained(base, local_files_only=Path(base).exists())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load a model config from {base!r} ({type(e).__name__})", field=field,
                              hint="give a local HF model directory, e.g. from `subq init-model`") from None
    deepspeed_config(cfg, cfg.num_workers)
    rows = read_training_rows(cfg.data, "data")
    train_rows, val_rows = (rows, read_training_rows(cfg.val_data, "val_data")) if cfg.val_data else \
        split_problems(rows, cfg.val_fraction)
    examples, stats = select_examples(train_rows, cfg.algo, cfg.rewards, cfg.filter_threshold, cfg.data)
    rd = run_dir(cfg)
    exists = storage.exists(rd) and bool(storage.list_files(rd))
    if exists and not cfg.resume:
        raise ConfigError(f"run directory {rd} already exists", field="name",
                          hint="pass --resume to continue it, or choose another --name")
    if cfg.resume and not exists:
        raise ConfigError(f"nothing to resume: {rd} does not exist", field="resume")
    return {**stats, "train_problems": len(train_rows), "val_problems": len(val_rows)}


def _clear_build_locks() -> None:
    """Stale torch-extension locks on this machine are cleared (or reported with the fix): a lock left by a killed
    op build would make a rank wait forever."""
    from subq import console
    from training.ds_ops import clear_stale_locks, lock_fix, use_own_extensions_dir

    use_own_extensions_dir()  # before Ray starts: local workers inherit it
    removed, live = clear_stale_locks()
    for lock in removed:
        console.echo(f"removed a stale torch extension lock left by a killed build: {lock}")
    for lock in live:
        console.echo(f"warning: a DeepSpeed op build holds {lock}; training waits for it (if no build is running: "
                     f"{lock_fix(lock)})")


@contextlib.contextmanager
def progress_line(cfg: TrainConfig, every_s: float = 2.0):
    """A progress line on the terminal's stderr while the run trains: step/total, loss, tokens/s (all ranks) and
    ETA, from what rank 0 logs to <run>/metrics.json (every `log_every` steps; any storage URI)."""
    import threading

    from subq import console

    path = storage.join(run_dir(cfg), "metrics.json")
    stop = threading.Event()
    bar = console.progress_bar(total=cfg.steps, desc=f"train {cfg.label}", unit="step")

    seen: list = [None]

    def update() -> None:
        try:
            last = json.loads(storage.read_bytes(path))[-1] if storage.exists(path) else None
        except (OSError, ValueError, IndexError):
            return  # being written; next time
        if not last or last.get("step") == seen[0]:
            return
        bar.update(int(last["step"]) - bar.n)
        seen[0] = last["step"]
        post = {"loss": f"{last['loss']:.3f}" if "loss" in last else "-",
                "tok/s": f"{last.get('tokens_per_s_rank', 0) * last.get('world_size', 1):.0f}"}
        if "val_bleu" in last:
            post["val_bleu"] = f"{last['val_bleu']:.1f}"
        bar.set_postfix(post, refresh=True)

    def poll() -> None:
        while not stop.wait(every_s):
            update()

    t = threading.Thread(target=poll, name="subq-train-progress", daemon=True)
    t.start()
    try:
        yield bar
    finally:
        stop.set()
        t.join(5)
        update()  # the last logged step, which a run shorter than the poll interval would otherwise never show
        bar.close()


def run_train(cfg: TrainConfig | dict, *, ray_init: dict | None = None, progress: bool = False) -> dict:
    """Validate, then train with Ray Train. Returns {run_dir, final_dir, best_dir, label, metrics, data,
    checkpoint}. progress: show `progress_line` on the terminal (subq train).
    Starts a local Ray (ray_init kwargs) only if none is running; joins a cluster under `ray job submit`."""
    if isinstance(cfg, dict):
        cfg = TrainConfig.model_validate(cfg)
    cfg = resolve_models(absolute_paths(cfg))  # a missing local model fails here, at once, before Ray or the hub

    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    counts = preflight(cfg)
    _clear_build_locks()
    from cluster.connect import ray_session

    with ray_session(**(ray_init or {})):  # disconnects at the end only what it connected
        from training.preflight import check_cluster

        check_cluster(cfg)  # against the cluster, before any worker starts (training/preflight.py)
        loop_cfg = {"cfg": cfg.model_dump(), "fault_at_step": os.environ.get(FAULT_ENV)}
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=loop_cfg,
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
            scaling_config=scaling_config(cfg),
            run_config=RunConfig(
                name=cfg.name, storage_path=_ray_storage(cfg.storage_path),
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                worker_runtime_env={"env_vars": network_env()},
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            ),
        )
        with progress_line(cfg) if progress else contextlib.nullcontext():
            result = _fit_interruptibly(trainer)
    if result.error:
        raise result.error
    rd = run_dir(cfg)
    best = storage.join(rd, "best")
    mpath = storage.join(rd, "metrics.json")
    notes = [n for n in [overfitting_note(json.loads(storage.read_bytes(mpath)))] if n] if storage.exists(mpath) else []
    if notes:
        from subq import console

        for n in notes:
            console.echo(f"note: {n} (best/ keeps the best validation BLEU)")
    return {"run_dir": rd, "final_dir": storage.join(rd, "final"),
            "best_dir": best if storage.exists(storage.join(best, "config.json")) else None,
            "label": cfg.label, "notes": notes, "metrics": result.metrics, "data": counts,
            "checkpoint": result.checkpoint.path if result.checkpoint else None}


def scaling_config(cfg: TrainConfig):
    """The ScalingConfig run_train gives TorchTrainer: what each Ray Train worker requests."""
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                         resources_per_worker={"CPU": cfg.cpus_per_worker})


#                                      nodes, eth0 in KubeRay pods, with no interface name to know in advance


def _fit_interruptibly(trainer):
    """`trainer.fit()` in a helper thread, so that Ctrl-C reaches the caller as KeyboardInterrupt. In the main
    thread Ray Train installs a SIGINT handler of its own and never restores the previous one (a later Ctrl-C, e.g.
    in `subq demo`'s serving stage, would be swallowed). Stopping the driver stops the run; its checkpoints stay
    for `--resume`."""
    import threading

    box: dict[str, Any] = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=fit, name="subq-train-fit", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.5)
    if "error" in box:
        raise box["error"]
    return box["result"]


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local relative paths -> absolute: workers do not run in the driver's working directory."""
    upd = {}
    for k in ("data", "val_data", "model", "init_from", "deepspeed", "storage_path"):
        v = getattr(cfg, k)
        if v and "://" not in v and (k == "storage_path" or Path(v).exists()):
            upd[k] = str(Path(v).resolve())
    return cfg.model_copy(update=upd)


def _ray_storage(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


# ---------------------------------------------------------------- entry point
