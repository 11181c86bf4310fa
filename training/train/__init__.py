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
import csv
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from subq import storage
from subq.errors import ConfigError, DataError
from training.config import (
    TrainConfig, choose_zero_stage, deepspeed_config, gpu_precision, native_bf16, run_dir, zero_stage,
)

FAULT_ENV = "SUBQ_TRAIN_FAULT_AT_STEP"  # tests: rank 1 exits at this optimizer step on the first attempt


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


def _announce_one_time_costs(cfg: TrainConfig) -> None:
    """Stale torch-extension locks on this machine are cleared (or reported with the fix); the one-time
    DeepSpeed CPU op build is announced with its expected duration."""
    from subq import console
    from training.ds_ops import build_notice, clear_stale_locks, lock_fix, use_own_extensions_dir

    use_own_extensions_dir()  # before Ray starts: local workers inherit it
    removed, live = clear_stale_locks()
    for lock in removed:
        console.echo(f"removed a stale torch extension lock left by a killed build: {lock}")
    for lock in live:
        console.echo(f"warning: a DeepSpeed op build holds {lock}; training waits for it (if no build is running: "
                     f"{lock_fix(lock)})")
    notice = build_notice(cfg.use_gpu)
    if notice:
        console.echo(notice)


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

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    counts = preflight(cfg)
    _announce_one_time_costs(cfg)
    started = False
    if not ray.is_initialized():
        from cluster.connect import init_ray
        init_ray(**(ray_init or {}))
        started = True
    try:
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
    finally:
        if started:
            ray.shutdown()
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


NETWORK_ENV_PREFIXES = ("NCCL_", "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME")


def scaling_config(cfg: TrainConfig):
    """The ScalingConfig run_train gives TorchTrainer: what each Ray Train worker requests."""
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                         resources_per_worker={"CPU": cfg.cpus_per_worker})


def network_env() -> dict:
    """The driver's NCCL_* / GLOO_SOCKET_IFNAME settings, passed to every training worker (e.g.
    NCCL_SOCKET_IFNAME=eth0 on TCP-only clusters, where NCCL would otherwise pick a wrong interface)."""
    return {k: v for k, v in os.environ.items() if k.startswith(NETWORK_ENV_PREFIXES)}


NCCL_IFNAME_DEFAULT = "^docker0,lo"  # every interface but Docker's bridge and loopback: ens5 on the launcher's EC2
#                                      nodes, eth0 in KubeRay pods, with no interface name to know in advance


def network_defaults(env, use_gpu: bool) -> dict:
    """NCCL's socket interface where nothing set one: `^docker0,lo` (NCCL's exclusion form) instead of a fixed name.
    Applied to each GPU worker's environment before its first NCCL call (NCCL reads it when the first communicator
    is set up); the driver's NCCL_SOCKET_IFNAME (network_env, passed in the workers' runtime env) and the node's own
    (its `ray start` environment) win. Returns what was set."""
    if not use_gpu or env.get("NCCL_SOCKET_IFNAME"):
        return {}
    env["NCCL_SOCKET_IFNAME"] = NCCL_IFNAME_DEFAULT
    return {"NCCL_SOCKET_IFNAME": NCCL_IFNAME_DEFAULT}


def run_stage(name: str, seconds: float, fn, *args, hint="", **kwargs):
    """fn(*args, **kwargs) in a helper thread while this thread waits at most `seconds` (<= 0: no limit); past that,
    StageTimeout naming the stage (and the hint; a callable is asked then). Unlike training.ds_ops.stage_timeout
    (an asynchronous exception, delivered at the next Python bytecode) this also ends a wait inside a C call, e.g.
    NCCL setting up its communicator in the first collective of `deepspeed.initialize` with a wrong interface. The
    helper thread stays blocked; the failed worker's process is ended by Ray Train."""
    import threading

    from training.ds_ops import StageTimeout

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name="subq-start-up-stage", daemon=True)
    t.start()
    t.join(seconds if seconds and seconds > 0 else None)
    if t.is_alive():
        msg = f"training start-up stuck in stage '{name}' for {seconds:.0f} s"
        hint = hint() if callable(hint) else hint
        raise StageTimeout(msg + (f"; {hint}" if hint else ""))
    if "error" in box:
        raise box["error"]
    return box.get("result")


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


# ---------------------------------------------------------------- worker


def _build_module(cfg: TrainConfig, tokenizer):
    """(the engine's module: the LM, plus ILQL heads (V, twin Q) for ilql; the saved target heads of an ILQL
    init_from, else None). ilql policy=frozen: the LM gets no gradient."""
    import torch
    import torch.nn as nn
    from transformers import AutoModelForCausalLM

    from training.ilql import ILQLHeads, load_heads, HEADS_FILE

    base = cfg.init_from or cfg.model
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)

    frozen = cfg.algo == "ilql" and cfg.ilql_dict().get("policy", "frozen") == "frozen"

    class Policy(nn.Module):
        def __init__(self, lm, heads):
            super().__init__()
            self.lm, self.heads = lm, heads

        def forward(self, input_ids, attention_mask):
            if frozen:
                self.lm.eval()  # no dropout: the heads learn on the features decoding will see
            with torch.no_grad() if frozen else contextlib.nullcontext():  # frozen: heads learn on fixed features
                out = self.lm(input_ids=input_ids, attention_mask=attention_mask,
                              output_hidden_states=self.heads is not None, use_cache=False)
            if self.heads is None:
                return out.logits, None, None, None, None
            h = out.hidden_states[-1]
            q1, q2, v = self.heads(h.to(self.heads.v_head[0].weight.dtype))
            return out.logits, h, q1, q2, v

    heads = target = None
    if cfg.algo == "ilql":
        torch.manual_seed(cfg.seed)
        if frozen:
            lm.requires_grad_(False)
        if cfg.init_from and (Path(cfg.init_from) / HEADS_FILE).exists():
            heads, target = load_heads(cfg.init_from)  # an ILQL checkpoint: its target heads come back too
            heads.train()
        else:
            emb = lm.get_output_embeddings().weight
            vocab = emb.ds_shape[0] if hasattr(emb, "ds_shape") else emb.shape[0]  # ZeRO-3: partitioned at init
            heads = ILQLHeads(lm.config.hidden_size, vocab)
    return Policy(lm, heads), target


def train_loop(loop_cfg: dict) -> None:
    """Per-worker loop (Ray Train calls it on every rank)."""
    cfg = TrainConfig.model_validate(loop_cfg["cfg"])
    from training.preflight import fetch_model

    cfg = cfg.model_copy(update={k: fetch_model(getattr(cfg, k)) for k in ("model", "init_from")
                                 if getattr(cfg, k) and "://" in getattr(cfg, k)})  # URI -> this node's copy
    os.environ["DS_ACCELERATOR"] = "cuda" if cfg.use_gpu else "cpu"  # before deepspeed is imported
    from training.ds_ops import use_own_extensions_dir

    use_own_extensions_dir()  # this environment's own JIT op builds (not ~/.cache, shared by every install)
    import deepspeed
    import ray.train
    import torch
    from ray.train import Checkpoint, CheckpointUploadMode
    from ray.train.torch import get_device
    from transformers import AutoTokenizer

    from subq.textformat import get_format
    from training.bc import bc_loss
    from training.data import (batches, collate, encode, read_training_rows, select_examples, split_problems,
                               val_problems)
    from training.ilql import ILQLConfig, TargetQHeads, ilql_losses, polyak_rate, polyak_update

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device() if cfg.use_gpu else torch.device("cpu")  # Ray Train set CUDA_VISIBLE_DEVICES, LOCAL_RANK
    if cfg.use_gpu:
        network_defaults(os.environ, True)  # before NCCL sets up its first communicator (lazily, at a collective)
        torch.cuda.set_device(device)  # this thread's device (deepspeed.initialize runs in a helper thread)
    torch.manual_seed(cfg.seed)
    fmt = get_format(cfg.text_format)
    ilql_cfg = ILQLConfig(**cfg.ilql_dict())
    upload_mode = CheckpointUploadMode.ASYNC if cfg.checkpoint_upload == "async" else CheckpointUploadMode.SYNC

    # data
    tok = AutoTokenizer.from_pretrained(cfg.init_from or cfg.model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # validation decoding pads prompts on the left (training batches: collate, right)
    rows = read_training_rows(cfg.data)
    train_rows, val_rows = (rows, read_training_rows(cfg.val_data, "val_data")) if cfg.val_data else \
        split_problems(rows, cfg.val_fraction)
    examples, _ = select_examples(train_rows, cfg.algo, cfg.rewards, cfg.filter_threshold, cfg.data)
    reward_mode = cfg.rewards if cfg.algo == "ilql" else None
    encoded = [e for e in (encode(x, tok, fmt, cfg.max_length, reward_mode, cfg.prompt_format) for x in examples)
               if e is not None]
    if not encoded:
        raise DataError(f"every example is longer than max_length={cfg.max_length}", field="max_length")
    val_sel, _ = select_examples(val_rows, "bc", "sparse") if val_rows else ([], {})
    val_encoded = [e for e in (encode(x, tok, fmt, cfg.max_length, None, cfg.prompt_format) for x in val_sel)
                   if e is not None]
    val_probs = val_problems(val_rows, cfg.eval_problems)

    # engine: precision (bf16 only on native bf16) and ZeRO stage (`auto`: from the model's size, the world size and
    # the smallest rank's memory), then deepspeed.initialize; every stage that may hang runs under a time limit
    from training.ds_ops import clear_stale_locks, lock_hint, stage_timeout

    clear_stale_locks()  # a lock left by a killed op build would make this rank wait forever
    with stage_timeout("DeepSpeed init_distributed (CPU op build, process group)", cfg.startup_timeout_s,
                       hint=lock_hint):
        deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")  # adopts Ray Train's group
    net_hint = _network_hint if cfg.use_gpu else lock_hint
    # the first collective (NCCL sets up its communicator here): the smallest rank's memory, for `auto`
    memory = run_stage("first collective (process group set-up; NCCL on GPUs)", cfg.startup_timeout_s,
                       _min_over_ranks, _rank_memory(cfg, ctx, device), device, world, hint=net_hint)
    bf16_native = native_bf16(device) if cfg.use_gpu else None
    chosen, zero_why = None, f"ZeRO stage from the DeepSpeed config ({cfg.deepspeed})"
    resumed_stage = _checkpoint_zero_stage(ray.train.get_checkpoint()) if cfg.deepspeed == "auto" else None
    if resumed_stage is not None:  # a resumed run keeps its ZeRO stage (the shards are per stage)
        chosen, zero_why = resumed_stage, f"ZeRO-{resumed_stage}: the stage of the checkpoint resumed from"
    elif cfg.deepspeed == "auto":
        trainable, frozen_n = _param_counts(cfg)
        first = gpu_precision(deepspeed_config(cfg, world, bf16_native, stage=0), device if cfg.use_gpu else None)[0]
        chosen, zero_why = choose_zero_stage(trainable, frozen_n, world, memory, first)
    ds_cfg = deepspeed_config(cfg, world, bf16_native, stage=chosen)
    stage = zero_stage(ds_cfg)
    precision, precision_why = gpu_precision(ds_cfg, device if cfg.use_gpu else None)
    bf16 = precision == "bf16"
    if rank == 0:
        print(f"subq train: {precision_why}; {zero_why}", flush=True)
    if stage == 3:  # from_pretrained then builds the LM under deepspeed.zero.Init: each rank holds only its shard
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_cfg = HfDeepSpeedConfig(ds_cfg)  # noqa: F841 (transformers keeps a weakref; keep it alive)
    module, target = _build_module(cfg, tok)
    if stage == 3:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # built; later plain models (validation replica, saves) are not zero.Init'ed
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if module.heads is not None and stage == 3 and half is not None:
        # the LM was built in bf16/fp16 under zero.Init; ZeRO-3 neither casts the heads nor accepts mixed dtypes
        module.heads.to(half)
    # fp32 target heads (restored from an ILQL init_from, else copied before ZeRO-3 partitions the online heads);
    # they stay outside the engine
    if module.heads is not None:
        target = (target if target is not None else TargetQHeads(module.heads)).float().to(device)

    def initialize():
        if cfg.use_gpu:
            torch.cuda.set_device(device)
        return deepspeed.initialize(model=module, model_parameters=[p for p in module.parameters() if p.requires_grad],
                                    config=ds_cfg)

    engine, _, _, _ = run_stage("deepspeed.initialize (weights broadcast or partitioned over NCCL/gloo)",
                                cfg.startup_timeout_s, initialize, hint=net_hint)

    # resume
    start_step, history = 0, []
    best = {"step": None, "val_bleu": float("-inf")}  # the release keeps the checkpoint with the best val BLEU
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag="ds", load_module_strict=True)
            # weights_only: a writable storage path must not mean code execution on every worker
            state = torch.load(Path(d) / "trainer_state.pt", map_location="cpu", weights_only=True)
        start_step, history = state["step"], state["history"]
        best = state.get("best") or best
        if target is not None:
            target.load_state_dict(state["target"])
    resumed_from = start_step
    fault_at = int(loop_cfg["fault_at_step"]) if loop_cfg.get("fault_at_step") else None

    data = batches(encoded, cfg.batch_size, rank, world, cfg.seed, start_batch=start_step * cfg.grad_accum)
    sync_rate = polyak_rate(ilql_cfg.polyak, ilql_cfg.target_sync_every)
    writer = _MetricsWriter(run_dir(cfg)) if rank == 0 else None
    best_writer = _CheckpointWriter() if rank == 0 else None  # best/ written off the loop (a CPU copy)
    replica: dict = {}  # ZeRO-3: the plain model validation decodes with (built once, refreshed per validation)
    t0, tokens, window = time.perf_counter(), 0, []
    step = start_step
    while step < cfg.steps:
        engine.train()
        for _ in range(cfg.grad_accum):
            items = next(data)
            tokens += sum(len(x["input_ids"]) for x in items)  # from the host lists: no device sync
            b = {k: v.to(device, non_blocking=True) for k, v in collate(items, tok.pad_token_id).items()}
            logits, h, q1, q2, v = engine(b["input_ids"], b["attention_mask"])
            if cfg.algo == "ilql":
                tq = target.action_values(h[:, :-1].detach(), b["input_ids"][:, 1:])  # the actions' target Q only
                loss, stats = ilql_losses(logits, q1, q2, tq, None, v, b["input_ids"], b["target_mask"],
                                          b["rewards"], ilql_cfg, host_stats=False)
            else:
                loss = bc_loss(logits, b["input_ids"], b["target_mask"])
                stats = {"loss": loss.detach()}
            engine.backward(loss)
            engine.step()
            window.append(stats)  # device tensors: read once per logging step
        step += 1
        if target is not None and step % ilql_cfg.target_sync_every == 0:
            polyak_update(target, engine.module.heads, sync_rate)
        if fault_at is not None and step == fault_at and rank == 1 and resumed_from == 0:
            os._exit(1)  # test hook: a worker dies mid-training on the first attempt only

        last = step == cfg.steps
        do_eval = last or (cfg.eval_every and step % cfg.eval_every == 0)
        do_ckpt = last or step % cfg.checkpoint_every == 0
        if not (do_eval or do_ckpt or step % cfg.log_every == 0):
            continue
        elapsed = time.perf_counter() - t0
        keys = list(window[0])
        means = torch.stack([torch.stack([s[k].float() for k in keys]) for s in window]).mean(0)
        if world > 1:  # every rank logs here at the same steps: the logged losses are the mean over all ranks'
            import torch.distributed as dist  # micro-batches (the global batch), not rank 0's shard alone

            dist.all_reduce(means)
            means = means / world
        metrics = dict(zip(keys, means.tolist()))  # the one device->host copy of this logging step
        metrics.update(step=step, tokens_per_s_rank=tokens / max(elapsed, 1e-9), resumed_from_step=resumed_from,
                       world_size=world, zero_stage=stage, bf16=bool(bf16), precision=precision)
        window, tokens, t0 = [], 0, time.perf_counter()
        if do_eval:
            metrics.update(_validate(engine, tok, fmt, val_encoded, val_probs, cfg, target, stage, device, rank, world,
                                     replica))
        history.append(metrics)
        if _improves_best(metrics, best, device):
            best = {"step": step, "val_bleu": float(metrics["val_bleu"])}
            _save_final(engine, tok, cfg, target, stage, rank, dest_name="best", info=best, writer=best_writer)
        metrics["best_step"] = best["step"]
        if writer is not None:
            writer.submit(history)  # json/csv/png written by a helper thread, off the training loop
        if do_ckpt:
            # a fresh local directory per checkpoint; Ray removes it once uploaded (async: in the background, while
            # training goes on; the run's end waits for the last upload)
            d = tempfile.mkdtemp(prefix="subq-ckpt-")
            engine.save_checkpoint(d, tag="ds")
            if rank == 0:
                torch.save({"step": step, "history": history, "best": best, "zero_stage": stage,
                            "target": target.state_dict() if target is not None else None},
                           Path(d) / "trainer_state.pt")
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_upload_mode=upload_mode,
                             delete_local_checkpoint_after_upload=True)
        else:
            ray.train.report(metrics)

    if best_writer is not None:
        best_writer.close()  # the last best/ is written (and a write error surfaces) before final/
    _save_final(engine, tok, cfg, target, stage, rank,
                info={"step": step, "best_step": best["step"], "precision": precision, "precision_reason": precision_why,
                      "zero_stage": stage, "zero_stage_reason": zero_why})
    if writer is not None:
        writer.close()  # the last metrics files are written (and a write error surfaces) before the run ends


def _improves_best(metrics: dict, best: dict, device) -> bool:
    """Whether this validation's BLEU beats the best so far (ties keep the earlier step). Rank 0 decides and
    broadcasts, so every rank takes part in the (ZeRO-3 collective) save or none does."""
    import torch
    import torch.distributed as dist

    if "val_bleu" not in metrics:  # every rank validates alike: no broadcast (a host sync) at plain log steps
        return False
    better = float(metrics["val_bleu"]) > best["val_bleu"]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([int(better)], device=device)
        dist.broadcast(flag, 0)
        better = bool(flag.item())
    return better


def rank_share(items: list, rank: int, world: int) -> list:
    """This rank's share of the validation set: every world-th item from `rank` (sizes differ by at most one)."""
    return items[rank::world]


def _eval_module(engine, stage: int, replica: dict, device):
    """The module validation runs on. Below ZeRO-3 every rank holds all weights: the engine's own module. Under
    ZeRO-3 a plain replica on this rank's device (compute dtype, built once), refreshed by one gather per parameter:
    decoding then needs no collective per token, so each rank decodes only its share and stops when its own
    problems are done (the engine's module would need every rank in every forward: fixed steps in lockstep)."""
    if stage != 3:
        return engine.module
    import deepspeed
    import torch.nn as nn
    from transformers import AutoModelForCausalLM

    from training.ilql import ILQLHeads

    src = engine.module
    if "module" not in replica:
        dtype = next(src.lm.parameters()).dtype
        holder = nn.Module()
        holder.lm = AutoModelForCausalLM.from_config(src.lm.config, dtype=dtype)
        holder.heads = ILQLHeads(src.heads.hidden_size, src.heads.vocab_size).to(dtype) if src.heads is not None \
            else None
        replica["module"] = holder.to(device).eval()
    dst = dict(replica["module"].named_parameters())
    missing = [n for n, _ in src.named_parameters() if n not in dst]
    if missing:
        raise RuntimeError(f"validation replica lacks parameters {missing[:5]}")
    for name, p in src.named_parameters():  # collective: every rank gathers the same parameters in the same order
        with deepspeed.zero.GatheredParameters([p]):
            dst[name].data.copy_(p.data)
    return replica["module"]


def _gather_lists(local: list, world: int) -> list[list]:
    """Every rank's list, in rank order (one all_gather_object); [local] alone on one rank."""
    if world <= 1:
        return [local]
    import torch.distributed as dist

    out: list = [None] * world
    dist.all_gather_object(out, local)
    return out


def _validate(engine, tok, fmt, val_encoded, val_probs, cfg, target, stage, device, rank: int = 0, world: int = 1,
              replica: dict | None = None) -> dict:
    """Validation loss (BC loss on the teacher sets, token-weighted over the whole validation set) and decoding
    metrics (BLEU vs the teacher's sub-questions, number of sub-questions) over `val_probs`. The set is split across
    the ranks (rank_share): each rank runs its share, decoding stops when its own problems are done (no fixed
    number of steps), and the results are combined (one all-reduce, one all-gather) so every rank has the same."""
    import sacrebleu
    import torch

    from training.data import collate
    from training.decomposer import Decomposer, generate_subquestions

    if not val_encoded and not val_probs:
        return {}
    engine.eval()
    model = _eval_module(engine, stage, replica if replica is not None else {}, device)
    model.eval()
    out: dict[str, Any] = {}
    with torch.no_grad():
        if val_encoded:
            tot = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of target-token losses, target tokens)
            mine = rank_share(val_encoded, rank, world)
            for i in range(0, len(mine), cfg.batch_size):
                b = {k: v.to(device) for k, v in collate(mine[i:i + cfg.batch_size], tok.pad_token_id).items()}
                logits = model.lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
                m = b["target_mask"][:, 1:].float()
                ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                       b["input_ids"][:, 1:].reshape(-1), reduction="none")
                tot += torch.stack([(ce.view_as(m) * m).sum(), m.sum()]).double()
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(tot)
            loss_sum, n_tok = tot.tolist()
            out["val_loss"] = loss_sum / max(n_tok, 1.0)
        if val_probs:
            d = Decomposer(model.lm, tok, fmt, str(device), model.heads, target,
                           config={"ilql": cfg.ilql_dict(), "prompt_format": cfg.prompt_format})
            mine = rank_share(val_probs, rank, world)
            local = []
            for i in range(0, len(mine), 8):
                gens = generate_subquestions(d, [p.problem for p in mine[i:i + 8]],
                                             max_new_tokens=cfg.eval_max_new_tokens)
                local += [(" ".join(g.questions), len(g.questions), bool(g.eos)) for g in gens]
            shares = _gather_lists(local, world)
            res: list = [None] * len(val_probs)
            for r, share in enumerate(shares):
                for k, x in enumerate(share):
                    res[r + k * world] = x  # rank_share's order back to the validation set's
            hyps = [x[0] for x in res]
            n_refs = max(len(p.references) for p in val_probs)
            refs = [[" ".join(p.references[k] if k < len(p.references) else p.references[0]) for p in val_probs]
                    for k in range(n_refs)]
            out["val_bleu"] = sacrebleu.corpus_bleu(hyps, refs).score
            out["val_num_subq"] = sum(x[1] for x in res) / len(res)
            out["val_ref_num_subq"] = sum(len(p.references[0]) for p in val_probs) / len(val_probs)
            out["val_parsed_frac"] = sum(1 for x in res if x[1]) / len(res)
            out["val_no_eos_frac"] = sum(1 for x in res if not x[2]) / len(res)  # cut by eval_max_new_tokens
            out["val_problems"] = len(res)
    engine.train()
    return out


class _CheckpointWriter:
    """Rank 0's best/ writes, done by one helper thread from a CPU copy of the weights, so that building the HF
    model, serializing it and uploading it to the storage path never stall the training loop; a newer best/
    supersedes one not started yet; a failed write is raised in the loop (next submit, or close)."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool, self.pending = ThreadPoolExecutor(1, thread_name_prefix="subq-best"), []

    def submit(self, job) -> None:
        for f in self.pending:
            f.cancel()  # not started yet: superseded by this newer best/
        self.pending = [f for f in self.pending if not f.cancelled()]
        for f in [f for f in self.pending if f.done()]:
            self.pending.remove(f)
            f.result()
        self.pending.append(self.pool.submit(job))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        pending, self.pending = self.pending, []
        for f in pending:
            if not f.cancelled():
                f.result()


class _MetricsWriter:
    """Rank 0's metrics files, written by one helper thread so that matplotlib and storage uploads never stall
    the training loop; each submit supersedes a pending one (only the latest history matters)."""

    def __init__(self, rd: str):
        from concurrent.futures import ThreadPoolExecutor

        self.rd, self.pool, self.pending = rd, ThreadPoolExecutor(1, thread_name_prefix="subq-metrics"), []

    def submit(self, history: list[dict]) -> None:
        for f in self.pending:
            f.cancel()  # not started yet: superseded by this newer history
        self.pending = [f for f in self.pending if not f.cancelled()]
        self.pending.append(self.pool.submit(_write_metrics, self.rd, [dict(h) for h in history]))
        for f in [f for f in self.pending if f.done()]:
            f.result()  # re-raise a failed write in the loop
            self.pending.remove(f)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for f in self.pending:
            if not f.cancelled():
                f.result()


def metric_panels(history: list[dict]) -> list[tuple[str, list[str]]]:
    """metrics.png's axes: (title, metric keys), one quantity per axis, only those logged."""
    keys = sorted({k for h in history for k in h})
    panels = [("loss", [k for k in keys if k.endswith("loss")]), ("val BLEU", ["val_bleu"]),
              ("#sub-questions", ["val_num_subq", "val_ref_num_subq"]), ("no-EOS share", ["val_no_eos_frac"])]
    panels = [(t, [k for k in ks if any(k in h for h in history)]) for t, ks in panels]
    return [(t, ks) for t, ks in panels if ks]


def overfitting_note(history: list[dict], rise: float = 0.05) -> str | None:
    """'overfitting: ...' when the validation loss rose more than `rise` (relative) above its minimum while the
    training loss kept falling; else None. Shown on metrics.png and returned by run_train as `notes`."""
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if len(val) < 2:
        return None
    lo_step, lo = min(val, key=lambda x: x[1])
    last_step, last = val[-1]
    train = {h["step"]: h["loss"] for h in history if "loss" in h}
    if last_step > lo_step and last > lo * (1 + rise) and train.get(last_step, 0) < train.get(lo_step, float("inf")):
        return (f"overfitting: validation loss rose from {lo:.3f} (step {lo_step}) to {last:.3f} (step {last_step}) "
                "while the training loss fell")
    return None


def _write_metrics(rd: str, history: list[dict]) -> None:
    """metrics.json, metrics.csv and metrics.png (loss curves + validation) in the run directory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    storage.write_bytes_atomic(storage.join(rd, "metrics.json"), json.dumps(history, indent=1).encode())
    keys = sorted({k for h in history for k in h}, key=lambda k: (k != "step", k))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    storage.write_bytes_atomic(storage.join(rd, "metrics.csv"), buf.getvalue().encode())
    # one quantity per axis: losses (train and validation), val BLEU, #sub-questions (ours vs the teacher's),
    # share of decompositions cut by the token budget; best/ marked on each; overfitting called out
    panels = metric_panels(history)
    best = next((h.get("best_step") for h in reversed(history) if h.get("best_step")), None)
    note = overfitting_note(history)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (title, ks) in zip(axes[0], panels):
        for k in ks:
            pts = [(h["step"], h[k]) for h in history if k in h]
            ax.plot(*zip(*pts), marker="o" if k.startswith("val") else ".", label=k)
        if best is not None:
            ax.axvline(best, color="green", linestyle="--", linewidth=1, label=f"best/ (step {best})")
        ax.set_xlabel("step"), ax.set_title(title), ax.legend(fontsize=7)
    if note:
        fig.suptitle(note, color="red", fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=80)
    plt.close(fig)
    storage.write_bytes_atomic(storage.join(rd, "metrics.png"), png.getvalue())


def _fp32_state_dict(engine, rank: int, skip_prefix: str | None = None) -> dict | None:
    """The full fp32 master weights (the optimizer's copy, not the bf16 compute copy) on rank 0, through
    DeepSpeed's public `safe_get_full_fp32_param` (ZeRO 1-3 and the bf16 optimizer); parameters without an
    optimizer copy (fp32 without ZeRO) are the parameters themselves, gathered under ZeRO-3. skip_prefix: names
    left out (a frozen policy: its compute copy may be bf16; the original is read from the model files instead).
    Every rank must call it (collectives); other ranks get None."""
    import contextlib

    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        if skip_prefix and name.startswith(skip_prefix):
            continue
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:
            with deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_id") else contextlib.nullcontext():
                full = p.detach().clone()
        if rank == 0:
            out[name] = full.float().cpu()
    return out if rank == 0 else None


_ORIGINAL_LM: dict = {}


def _original_lm_state(cfg: TrainConfig) -> dict:
    """The frozen policy's weights as the model files hold them, fp32 (read once, on rank 0): under bf16 the
    engine's copy of a frozen LM is bf16-rounded and has no fp32 master."""
    import torch
    from transformers import AutoModelForCausalLM

    base = cfg.init_from or cfg.model
    if base not in _ORIGINAL_LM:
        lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        _ORIGINAL_LM.clear()
        _ORIGINAL_LM[base] = {k: v.detach() for k, v in lm.named_parameters()}
    return _ORIGINAL_LM[base]


def _frozen_policy(cfg: TrainConfig) -> bool:
    return cfg.algo == "ilql" and cfg.ilql_dict().get("policy", "frozen") == "frozen"


def _save_final(engine, tok, cfg: TrainConfig, target, stage: int, rank: int, dest_name: str = "final",
                info: dict | None = None, writer: "_CheckpointWriter | None" = None) -> None:
    """Consolidate the fp32 master weights (every ZeRO stage, bf16 or not; a frozen policy: its original fp32
    weights) on rank 0 (collective: every rank takes part) and save HF format to <run>/<dest_name> (final/ or
    best/), with checkpoint.json = info. writer: the write is done by its helper thread from the CPU copy."""
    import functools

    frozen = _frozen_policy(cfg)
    sd = _fp32_state_dict(engine, rank, skip_prefix="lm." if frozen else None)
    if rank != 0:
        return
    if frozen:
        sd.update({f"lm.{k}": v for k, v in _original_lm_state(cfg).items()})
    module = engine.module
    heads = (module.heads.hidden_size, module.heads.vocab_size) if module.heads is not None else None
    target_sd = {k: v.detach().float().cpu().clone() for k, v in target.state_dict().items()} \
        if target is not None else None
    job = functools.partial(_write_model_dir, sd, module.lm.config, tok, cfg, heads, target_sd, dest_name, info)
    if writer is None:
        job()
    else:
        writer.submit(job)


def _write_model_dir(sd: dict, lm_config, tok, cfg: TrainConfig, heads: tuple | None, target_sd: dict | None,
                     dest_name: str, info: dict | None) -> None:
    """Rank 0: the consolidated fp32 state dict -> HF model directory <run>/<dest_name> (+ ILQL heads, training
    config, checkpoint.json); plain CPU work and storage writes (safe in a helper thread)."""
    import types

    import torch
    import yaml
    from transformers import AutoModelForCausalLM

    from training.decomposer import CONFIG_FILE
    from training.ilql import save_heads
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # rank 0 alone builds the plain model below: no zero.Init (a collective)
    lm_sd = {k[3:]: v for k, v in sd.items() if k.startswith("lm.")}
    fresh = AutoModelForCausalLM.from_config(lm_config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict({k: v.float() for k, v in lm_sd.items()}, strict=False)
    params = {k for k, _ in fresh.named_parameters()}  # tied duplicates (lm_head.weight) are not listed here
    tied = (set(fresh.state_dict()) - params) | (params - set(lm_sd))
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"consolidated state dict does not fit the model: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    with tempfile.TemporaryDirectory() as d:
        fresh.save_pretrained(d)
        tok.save_pretrained(d)
        if heads is not None:
            heads_sd = {k[6:]: v for k, v in sd.items() if k.startswith("heads.")}
            save_heads(d, types.SimpleNamespace(hidden_size=heads[0], vocab_size=heads[1]), None, state=heads_sd,
                       target_state=target_sd)
        saved = cfg.model_dump()
        Path(d, CONFIG_FILE).write_text(yaml.safe_dump(saved, sort_keys=False))
        Path(d, "checkpoint.json").write_text(json.dumps({"kind": dest_name, **(info or {})}))
        dest = storage.join(run_dir(cfg), dest_name)
        for f in sorted(Path(d).iterdir()):
            storage.write_bytes_atomic(storage.join(dest, f.name), f.read_bytes())


# ---------------------------------------------------------------- worker helpers: memory, sizes, network


def _rank_memory(cfg: TrainConfig, ctx, device) -> int:
    """Bytes of memory this rank may fill: its GPU's, or on CPU the node's RAM over the workers on the node."""
    if cfg.use_gpu:
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return int(psutil.virtual_memory().total // max(1, ctx.get_local_world_size()))


def _min_over_ranks(value: int, device, world: int) -> int:
    """The smallest `value` over the ranks (one all-reduce; every rank decides the ZeRO stage alike)."""
    if world <= 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _param_counts(cfg: TrainConfig) -> tuple[int, int]:
    """(trainable, frozen) parameters of the engine's module, counted on the meta device from the model's config
    (no weights read): the LM, plus for ILQL the V and twin Q heads; a frozen policy's LM is frozen."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from training.ilql import ILQLHeads

    conf = AutoConfig.from_pretrained(cfg.init_from or cfg.model)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(conf)
        n_lm = sum(p.numel() for p in lm.parameters())
        if cfg.algo != "ilql":
            return n_lm, 0
        heads = ILQLHeads(conf.hidden_size, lm.get_output_embeddings().weight.shape[0])
        n_heads = sum(p.numel() for p in heads.parameters())
    return (n_heads, n_lm) if _frozen_policy(cfg) else (n_lm + n_heads, 0)


def _checkpoint_zero_stage(ckpt) -> int | None:
    """The ZeRO stage a Ray Train checkpoint was written with (its trainer_state.pt alone is read), or None."""
    if ckpt is None:
        return None
    import torch

    try:
        with ckpt.filesystem.open_input_file(f"{ckpt.path.rstrip('/')}/trainer_state.pt") as fh:
            data = fh.read()
    except (FileNotFoundError, OSError):
        return None
    stage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True).get("zero_stage")
    return int(stage) if stage is not None else None


def _network_hint() -> str:
    return (f"NCCL_SOCKET_IFNAME={os.environ.get('NCCL_SOCKET_IFNAME', '')!r}: the nodes must reach each other on "
            "that interface (NCCL_DEBUG=INFO in the driver's environment shows the one NCCL picked)")


# ---------------------------------------------------------------- entry point
